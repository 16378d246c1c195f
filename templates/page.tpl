<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>chat.py</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/chat.css">
<link rel="stylesheet" href="/static/pygments.css">
<!-- Show 4xx/5xx bodies (readable messages) in #form-error instead of dropping them. -->
<meta name="htmx-config" content='{"responseHandling":[{"code":"204","swap":false},{"code":"[23]..","swap":true},{"code":"[45]..","swap":true,"error":false,"target":"#form-error","swapOverride":"innerHTML"}],"allowEval":false,"includeIndicatorStyles":false}'>
<script src="/static/htmx.min.js"></script>
<script src="/static/htmx-ext-sse.js"></script>
<script src="/static/chat.js" defer></script>
</head>
<body>
<header class="top">
  <h1>chat.py</h1>
  <span class="upstream">{{upstream}}</span>
</header>
<main>
% if demo:
  <p class="banner">You are talking to the <strong>built-in demo model</strong>, which only echoes you.
  To connect a real model, restart with its address, for example
  <code>OPENAI_BASE_URL=http://localhost:11434/v1 python chat.py</code> (Ollama) — see <code>python chat.py --help</code>.</p>
% end
  <div id="chat-messages" aria-label="Conversation"></div>
  <div id="status" class="visually-hidden" role="status" aria-live="polite"></div>
</main>
<form id="composer" hx-post="/streaming" hx-target="#chat-messages" hx-swap="beforeend" hx-disabled-elt="#send">
  <div id="form-error" aria-live="assertive"></div>
  <div class="row">
    <textarea name="prompt" id="prompt" rows="2" placeholder="Message (Enter to send, Shift+Enter for a new line)" aria-label="Message" autofocus></textarea>
    <button type="submit" id="send" aria-label="Send message">Send</button>
  </div>
</form>
</body>
</html>
