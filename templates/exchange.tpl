% include("user", prompt=prompt, message_id=question_id, conversation_id=conversation['id'], nav="", files=files)
% include("streaming", stream_id=stream_id)
% include("parent", leaf=leaf)
% include("options_summary", active=active, oob=True)
% if created:
<title>{{conversation['title']}} — chat.py</title>
<input type="hidden" name="conversation" id="conversation" value="{{conversation['id']}}" hx-swap-oob="true">
<div hx-swap-oob="afterbegin:#conversation-list">
% include("conversation_item", item=conversation, current=True)
</div>
<div id="conversation-head" hx-swap-oob="true">
% include("conversation_head", conversation=conversation)
</div>
% end
