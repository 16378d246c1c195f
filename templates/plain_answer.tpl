<div class="msg assistant streaming plain" role="article" aria-label="Answer" aria-busy="true">
  <form class="actions" method="post" action="/stop?stream={{stream_id}}"><button type="submit" class="stop" aria-label="Stop generating">Stop</button></form>
  <div class="content markdown live"><div class="tokens">