% if conversation:
<h2 id="conversation-title">{{conversation['title']}}</h2>
<div class="conversation-actions">
  <button type="button" hx-post="/c/{{conversation['id']}}/rename" hx-prompt="New title for this conversation" hx-target="#conversation-title" hx-swap="innerHTML" aria-label="Rename conversation">Rename</button>
  <a class="button" href="/c/{{conversation['id']}}/export.md" download>Markdown</a>
  <a class="button" href="/c/{{conversation['id']}}/export.json" download>JSON</a>
  <button type="button" hx-delete="/c/{{conversation['id']}}" hx-confirm="Delete this conversation? This cannot be undone." hx-swap="none" aria-label="Delete conversation">Delete</button>
</div>
% end
