<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>{{status}} — chat.py</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/chat.css">
</head>
<body class="message-page">
<main>
  <h1><a href="/">chat.py</a></h1>
  <h2>{{status}}</h2>
  <p>{{message}}</p>
  <p><a class="button" href="/">Back to the chat</a></p>
</main>
</body>
</html>
