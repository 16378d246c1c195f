<div class="msg user"{{!' id="user-m%s"' % message_id if conversation_id else ''}} role="article" aria-label="You"><div class="bubble">{{prompt}}</div>
% include("attachments", files=files)
% if conversation_id:
  <div class="actions">
    {{!moment(created)}}
    {{!nav}}
    <details class="edit">
      <summary class="button" aria-label="Edit this message and send it again">Edit</summary>
      <form method="post" action="/c/{{conversation_id}}/edit" hx-post="/c/{{conversation_id}}/edit" hx-target="#chat-messages" hx-swap="innerHTML">
        <input type="hidden" name="message" value="{{message_id}}">
        <textarea name="prompt" rows="3" aria-label="Edited message" required>{{prompt}}</textarea>
        <div class="edit-buttons"><a class="button cancel" href="/c/{{conversation_id}}#user-m{{message_id}}">Cancel</a> <button type="submit">Send</button></div>
      </form>
    </details>
  </div>
% end
</div>
