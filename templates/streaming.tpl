<div class="msg assistant streaming" id="answer-{{stream_id}}" role="article" aria-label="Answer" hx-ext="sse" sse-connect="/events?stream={{stream_id}}" sse-swap="done" hx-swap="outerHTML" aria-busy="true">
  <details class="reasoning"><summary>Thinking…</summary><div class="reasoning-text" sse-swap="reasoning" hx-swap="beforeend"></div></details>
  <div class="content markdown live"><div class="blocks" sse-swap="block" hx-swap="beforeend"></div><div class="tail" sse-swap="tail" hx-swap="none"></div><div class="tokens" id="tail-{{stream_id}}" sse-swap="message" hx-swap="beforeend"></div></div>
  <div class="status" sse-swap="status" hx-swap="innerHTML"></div>
  <div class="actions">{{!moment(created)}}{{!get('nav', '')}}<form class="stop-form" method="post" action="/stop?stream={{stream_id}}" hx-post="/stop?stream={{stream_id}}" hx-swap="none"><button type="submit" class="stop" aria-label="Stop generating">Stop</button></form></div>
</div>
