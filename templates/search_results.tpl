% if query:
<h2 class="group">Results</h2>
% if not results:
<p class="no-results">Nothing found for “{{query}}”.</p>
% end
<ul>
% for result in results:
<li><a href="{{result['href']}}"><span class="result-title">{{result['title']}}</span>
% if result['snippet']:
<span class="snippet">{{!result['snippet']}}</span>
% end
% if result['archived']:
<span class="tag">Archived</span>
% end
</a></li>
% end
</ul>
% end
