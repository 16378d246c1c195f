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
<meta name="htmx-config" content='{"responseHandling":[{"code":"204","swap":false},{"code":"[23]..","swap":true},{"code":"[45]..","swap":true,"error":false,"target":"#form-error","swapOverride":"innerHTML"}],"allowEval":false,"includeIndicatorStyles":false,"historyCacheSize":0,"scrollIntoViewOnBoost":false}'>
<script src="/static/htmx.min.js"></script>
<script src="/static/htmx-ext-sse.js"></script>
<script src="/static/chat.js" defer></script>
</head>
<body>
<a class="skip-link" href="#prompt">Skip to the message box</a>
<header class="top">
  <button type="button" class="menu" aria-controls="sidebar" aria-expanded="false" aria-label="Conversations">☰</button>
  <h1><a href="/">chat.py</a></h1>
  <span class="upstream">{{upstream}}</span>
  <a class="button new-top" href="/">New chat</a>
% if user:
  <a class="account" href="/account" title="Your account and where you are signed in">{{user}}</a>
% end
% if password:
  <form method="post" action="/logout" class="logout"><button type="submit">Log out</button></form>
% end
</header>
<div class="layout">
<nav class="sidebar" id="sidebar" aria-label="Conversations" hx-boost="true">
  <details open>
    <summary>Conversations</summary>
    <a class="button new" href="/">New chat</a>
    <form class="search" role="search" method="get" action="/search" hx-get="/search" hx-trigger="input changed delay:250ms from:#search, submit" hx-target="#search-results" hx-swap="innerHTML" hx-push-url="false">
      <input type="search" name="q" id="search" value="{{query}}" placeholder="Search (Ctrl+K)" aria-label="Search conversations" autocomplete="off">
    </form>
    <div id="search-results" aria-live="polite">
% include("search_results", results=results or [], query=query)
    </div>
    <div id="conversations">
{{!lists}}
    </div>
    <details class="import">
      <summary>Import a conversation</summary>
      <form method="post" action="/import" enctype="multipart/form-data">
        <label for="import-file">A conversation exported as JSON</label>
        <input type="file" name="file" id="import-file" accept="application/json,.json" required>
        <button type="submit">Import</button>
      </form>
    </details>
  </details>
</nav>
<main>
% if demo:
  <p class="banner">You are talking to the <strong>built-in demo model</strong>, which only echoes you.
  To connect a real model, restart with its address, for example
  <code>OPENAI_BASE_URL=http://localhost:11434/v1 python chat.py</code> (Ollama) — see <code>python chat.py --help</code>.</p>
% end
  <div id="model-server" role="status">{{!notice}}</div>
% if deleted:
  <div class="undo" role="status"><form method="post" action="/c/{{deleted['id']}}/restore">“{{deleted['title']}}” was deleted. <button type="submit">Undo</button></form></div>
% end
  <div id="conversation-head">
% include("conversation_head", conversation=conversation)
  </div>
  <div id="chat-messages"{{!' role="feed" aria-label="Messages"' if bubbles else ''}}>
% for bubble in bubbles:
{{!bubble}}
% end
  </div>
  <div id="status" class="visually-hidden" role="status" aria-live="polite"></div>
</main>
</div>
<form id="composer" aria-label="Message" method="post" action="/streaming" enctype="multipart/form-data" hx-post="/streaming" hx-target="#chat-messages" hx-swap="beforeend" hx-disabled-elt="#send"{{!' class="answering"' if answering else ''}}>
  <!-- The first submit button is what Enter in a field presses: Send, not the options panel's Save preset. -->
  <button type="submit" class="default-send" hidden tabindex="-1">Send</button>
  <div id="form-error" aria-live="assertive">
% if error:
    <p class="error" role="alert">{{error}}</p>
% end
  </div>
  <input type="hidden" name="conversation" id="conversation" value="{{conversation['id'] if conversation else ''}}">
  <input type="hidden" name="parent" id="parent" value="{{leaf or ''}}">
{{!options}}
  <div class="attach-row">
    <label for="attachment" class="attach">Attach images or text files</label>
    <input type="file" name="attachment" id="attachment" multiple>
    <div id="attachment-previews" aria-live="polite"></div>
  </div>
  <div class="row">
    <textarea name="prompt" id="prompt" rows="2" placeholder="Message" aria-label="Message" autofocus>{{draft}}</textarea>
    <button type="submit" id="send" aria-label="Send message">Send</button>
    <button type="button" id="stop-answer" aria-label="Stop generating (Escape)">Stop</button>
  </div>
  <button type="button" id="jump" class="jump" hidden>↓ Jump to latest</button>
</form>
<dialog id="shortcuts" aria-labelledby="shortcuts-title">
  <h2 id="shortcuts-title">Keyboard shortcuts</h2>
  <dl>
    <dt><kbd>Enter</kbd></dt><dd>Send (on a touch screen: a new line)</dd>
    <dt><kbd>Shift</kbd> + <kbd>Enter</kbd></dt><dd>A new line</dd>
    <dt><kbd>↑</kbd> in the empty message box</dt><dd>Edit your last message</dd>
    <dt><kbd>Escape</kbd></dt><dd>Stop the answer</dd>
    <dt><kbd>Ctrl</kbd> + <kbd>Shift</kbd> + <kbd>O</kbd></dt><dd>New chat</dd>
    <dt><kbd>Ctrl</kbd> + <kbd>K</kbd></dt><dd>Search the conversations</dd>
    <dt><kbd>?</kbd></dt><dd>This list</dd>
  </dl>
  <form method="dialog"><button type="submit">Close</button></form>
</dialog>
<!-- The preset picker's own form: its controls sit in the options panel (form="presets"). -->
<form id="presets" method="get" action="{{here}}" hx-get="{{here}}" hx-select="#options" hx-target="#options" hx-swap="outerHTML"><input type="hidden" name="conversation" value="{{conversation['id'] if conversation else ''}}"></form>
</body>
</html>
