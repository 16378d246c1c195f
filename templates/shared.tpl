<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="robots" content="noindex">
<title>{{conversation['title']}} — chat.py</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/chat.css">
<link rel="stylesheet" href="/static/pygments.css">
<script src="/static/chat.js" defer></script>
</head>
<body>
<header class="top">
  <h1><a href="/">chat.py</a></h1>
  <span class="upstream">A shared conversation, read-only</span>
</header>
<main>
  <div id="conversation-head"><h2 id="conversation-title">{{conversation['title']}}</h2></div>
  <div id="chat-messages" role="feed" aria-label="Messages">
% for bubble in bubbles:
{{!bubble}}
% end
  </div>
  <div id="status" class="visually-hidden" role="status" aria-live="polite"></div>
</main>
</body>
</html>
