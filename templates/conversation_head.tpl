% if conversation:
<h2 id="conversation-title">{{conversation['title']}}</h2>
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
  <a class="button" href="/c/{{conversation['id']}}/delete" hx-delete="/c/{{conversation['id']}}" hx-confirm="Delete this conversation? This cannot be undone." hx-swap="none" aria-label="Delete conversation">Delete</a>
</div>
% end
