% include("user", prompt=prompt, message_id=question_id, conversation_id=conversation['id'], nav="", files=files, created=asked)
% include("streaming", stream_id=stream_id, created=asked)
% include("parent", leaf=leaf)
% include("options_summary", active=active, oob=True)
% if created:
<title>{{conversation['title']}} — chat.py</title>
<input type="hidden" name="conversation" id="conversation" value="{{conversation['id']}}" hx-swap-oob="true">
<div id="conversations" hx-swap-oob="true">
{{!lists}}
</div>
<div id="conversation-head" hx-swap-oob="true">
% include("conversation_head", conversation=conversation)
</div>
% end
