<li><a href="/c/{{item['id']}}" id="conv-{{item['id']}}"{{!' aria-current="page"' if current else ''}}>{{item['title']}}</a></li>
