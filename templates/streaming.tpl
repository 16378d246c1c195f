<div class="msg assistant streaming" id="answer-{{stream_id}}" hx-ext="sse" sse-connect="/events?stream={{stream_id}}" sse-swap="done" hx-swap="outerHTML" aria-busy="true">
  <details class="reasoning"><summary>Thinking…</summary><div class="reasoning-text" sse-swap="reasoning" hx-swap="beforeend"></div></details>
  <div class="tokens" sse-swap="message" hx-swap="beforeend"></div>
  <div class="status" sse-swap="status" hx-swap="innerHTML"></div>
  <div class="actions"><button type="button" class="stop" hx-post="/stop?stream={{stream_id}}" hx-swap="none" aria-label="Stop generating">Stop</button></div>
</div>
