% if query and not results:
<li class="no-results">Nothing found for “{{query}}”.</li>
% end
% for result in results:
<li><a href="{{result['href']}}"><span class="result-title">{{result['title']}}</span>
% if not result['in_title']:
<span class="snippet">{{!result['snippet']}}</span>
% end
</a></li>
% end
