% if conversation:
<h2 id="conversation-title">{{conversation['title']}}</h2>
% if conversation['archived']:
<p class="note">Archived: this conversation is out of the list; search still finds it.</p>
% end
<div class="conversation-actions">
  <details class="rename">
    <summary class="button" aria-label="Rename conversation">Rename</summary>
    <form method="post" action="/c/{{conversation['id']}}/rename" hx-post="/c/{{conversation['id']}}/rename" hx-target="#conversation-title" hx-swap="innerHTML">
      <input name="title" value="{{conversation['title']}}" maxlength="120" required aria-label="New title">
      <button type="submit">Save</button>
    </form>
  </details>
  <a class="button" href="/c/{{conversation['id']}}/export.md" download>Markdown</a>
  <a class="button" href="/c/{{conversation['id']}}/export.json" download>JSON</a>
% for form, action in (("pin", "unpin" if conversation['pinned'] else "pin"), ("archive", "unarchive" if conversation['archived'] else "archive")):
  <form class="place" id="{{form}}-form" method="post" action="/c/{{conversation['id']}}/{{action}}" hx-post="/c/{{conversation['id']}}/{{action}}" hx-target="#conversation-head"><button type="submit" aria-label="{{action.capitalize()}} conversation">{{action.capitalize()}}</button></form>
% end
  <a class="button" href="/c/{{conversation['id']}}/delete" hx-delete="/c/{{conversation['id']}}" hx-swap="none" aria-label="Delete conversation">Delete</a>
</div>
% end
