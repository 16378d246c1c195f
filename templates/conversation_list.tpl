<div id="conversation-list">
% for heading, items in groups:
  <h2 class="group">{{heading}}</h2>
  <ul>
% for item in items:
% include("conversation_item", item=item, current=item['id'] == current)
% end
  </ul>
% end
</div>
% if archived:
<details class="archived"{{!' open' if any(item['id'] == current for item in archived) else ''}}>
  <summary>Archived ({{len(archived)}})</summary>
  <ul>
% for item in archived:
% include("conversation_item", item=item, current=item['id'] == current)
% end
  </ul>
</details>
% end
