<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>Delete {{conversation['title']}} — chat.py</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/chat.css">
</head>
<body class="message-page">
<main>
  <h1><a href="/">chat.py</a></h1>
  <h2>Delete “{{conversation['title']}}”?</h2>
  <p>The conversation and all its messages are deleted. The next page offers Undo, for an hour.</p>
  <form method="post" action="/c/{{conversation['id']}}/delete"><button type="submit">Delete it</button> <a class="button" href="/c/{{conversation['id']}}">Keep it</a></form>
</main>
</body>
</html>
