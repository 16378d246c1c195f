<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>{{conversation['title'] + ' — ' if conversation else ''}}chat.py</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/chat.css">
<link rel="stylesheet" href="/static/pygments.css">
<!-- Show 4xx/5xx bodies (readable messages) in #form-error instead of dropping them. -->
<meta name="htmx-config" content='{"responseHandling":[{"code":"204","swap":false},{"code":"[23]..","swap":true},{"code":"[45]..","swap":true,"error":false,"target":"#form-error","swapOverride":"innerHTML"}],"allowEval":false,"includeIndicatorStyles":false,"historyCacheSize":0}'>
<script src="/static/htmx.min.js"></script>
<script src="/static/htmx-ext-sse.js"></script>
<script src="/static/chat.js" defer></script>
</head>
<body>
<a class="skip-link" href="#prompt">Skip to the message box</a>
<header class="top">
  <h1><a href="/">chat.py</a></h1>
  <span class="upstream">{{upstream}}</span>
% if password:
  <form method="post" action="/logout" class="logout"><button type="submit">Log out</button></form>
% end
</header>
<div class="layout">
<nav class="sidebar" aria-label="Conversations" hx-boost="true">
  <details open>
    <summary>Conversations</summary>
    <a class="button new" href="/">New chat</a>
    <ul id="conversation-list">
% for item in conversations:
% include("conversation_item", item=item, current=bool(conversation and item['id'] == conversation['id']))
% end
    </ul>
  </details>
</nav>
<main>
% if demo:
  <p class="banner">You are talking to the <strong>built-in demo model</strong>, which only echoes you.
  To connect a real model, restart with its address, for example
  <code>OPENAI_BASE_URL=http://localhost:11434/v1 python chat.py</code> (Ollama) — see <code>python chat.py --help</code>.</p>
% end
  <div id="conversation-head">
% include("conversation_head", conversation=conversation)
  </div>
  <div id="chat-messages" aria-label="Messages">
% for bubble in bubbles:
{{!bubble}}
% end
  </div>
  <div id="status" class="visually-hidden" role="status" aria-live="polite"></div>
</main>
</div>
<form id="composer" method="post" action="/streaming" hx-post="/streaming" hx-target="#chat-messages" hx-swap="beforeend" hx-disabled-elt="#send"{{!' class="answering"' if answering else ''}}>
  <div id="form-error" aria-live="assertive">
% if error:
    <p class="error" role="alert">{{error}}</p>
% end
  </div>
  <input type="hidden" name="conversation" id="conversation" value="{{conversation['id'] if conversation else ''}}">
  <details class="options">
    <summary>Model and system prompt</summary>
    <label for="model">Model</label>
% if models:
    <select name="model" id="model">
% else:
    <!-- The model list is asked for in the background; fetch it once it is there. -->
    <select name="model" id="model" hx-get="/model-options" hx-trigger="load" hx-target="this" hx-swap="innerHTML">
% end
% include("model_options", models=models, model=model, label=label)
    </select>
    <label for="system">System prompt</label>
    <textarea name="system" id="system" rows="3" placeholder="Optional instructions for the model in this conversation">{{conversation['system_prompt'] if conversation else ''}}</textarea>
  </details>
  <div class="row">
    <textarea name="prompt" id="prompt" rows="2" placeholder="Message (Enter to send, Shift+Enter for a new line)" aria-label="Message" autofocus>{{draft}}</textarea>
    <button type="submit" id="send" aria-label="Send message">Send</button>
    <button type="button" id="stop-answer" aria-label="Stop the answer (Escape)">Stop</button>
  </div>
</form>
</body>
</html>
