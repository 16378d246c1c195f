<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>Log in — chat.py</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/chat.css">
</head>
<body class="login">
<main>
  <h1>chat.py</h1>
  <form method="post" action="/login">
% if accounts:
    <label for="username">User name</label>
    <input type="text" name="username" id="username" value="{{username}}" autocomplete="username" autocapitalize="none" spellcheck="false" autofocus required>
% end
    <label for="password">Password</label>
    <input type="password" name="password" id="password" autocomplete="current-password"{{'' if accounts else ' autofocus'}} required>
    <input type="hidden" name="next" value="{{next}}">
    <button type="submit">Log in</button>
% if error:
    <p class="error" role="alert">{{error}}</p>
% end
  </form>
</main>
</body>
</html>
