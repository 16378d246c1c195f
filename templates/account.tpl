<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>Your account — chat.py</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/chat.css">
</head>
<body class="message-page">
<main>
  <h1><a href="/">chat.py</a></h1>
  <h2>Signed in as {{user['name']}}</h2>
% if proxy:
  <p>You sign in through the proxy in front of this server; it decides when you are signed out.</p>
% end
% if sessions:
  <table class="sessions">
    <caption>Where you are signed in</caption>
    <thead><tr><th scope="col">Browser</th><th scope="col">Signed in</th><th scope="col">Last used</th></tr></thead>
    <tbody>
% for row in sessions:
      <tr><td>{{row['agent'] or 'unknown browser'}}{{' (this one)' if row['token_hash'] == here else ''}}</td><td>{{when(row['created'])}}</td><td>{{when(row['seen'])}}</td></tr>
% end
    </tbody>
  </table>
  <form method="post" action="/account/sign-out-everywhere">
    <button type="submit">Sign out everywhere</button>
  </form>
% end
  <p>A new password is set by whoever runs this server: <code>python chat.py user passwd {{user['name']}}</code>.</p>
  <p><a class="button" href="/">Back to the chat</a></p>
</main>
</body>
</html>
