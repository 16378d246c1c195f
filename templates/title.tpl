<title>{{conversation['title']}} — chat.py</title>
{{conversation['title']}}
<a href="/c/{{conversation['id']}}" id="conv-{{conversation['id']}}" hx-swap-oob="true" aria-current="page">{{conversation['title']}}</a>
