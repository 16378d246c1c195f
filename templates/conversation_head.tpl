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
  <form method="post" action="/c/{{conversation['id']}}/share" hx-post="/c/{{conversation['id']}}/share" hx-target="#conversation-head" hx-swap="innerHTML"><button type="submit" aria-label="Share a read-only link">Share</button></form>
</div>
%   if get('shares'):
<ul class="shares" aria-label="Read-only links: anyone who has one sees this conversation as it is now">
%     for link, token in shares:
  <li><a href="{{link}}" target="_blank" rel="noopener">{{link}}</a>
    <button type="button" class="copy" data-copy="link">Copy link</button>
    <form method="post" action="/c/{{conversation['id']}}/unshare" hx-post="/c/{{conversation['id']}}/unshare" hx-target="#conversation-head" hx-swap="innerHTML"><input type="hidden" name="token" value="{{token}}"><button type="submit">Revoke</button></form></li>
%     end
</ul>
%   end
% end
