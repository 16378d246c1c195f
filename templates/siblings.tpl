<span class="siblings" role="group" aria-label="Version {{position + 1}} of {{len(ids)}}">
  <form method="post" action="/c/{{conversation_id}}/branch" hx-post="/c/{{conversation_id}}/branch" hx-target="#chat-messages" hx-swap="innerHTML"><input type="hidden" name="to" value="{{ids[max(position - 1, 0)]}}"><button type="submit" class="prev" aria-label="Previous version"{{!' disabled' if position == 0 else ''}}>‹</button></form>
  <span class="position">{{position + 1}}/{{len(ids)}}</span>
  <form method="post" action="/c/{{conversation_id}}/branch" hx-post="/c/{{conversation_id}}/branch" hx-target="#chat-messages" hx-swap="innerHTML"><input type="hidden" name="to" value="{{ids[min(position + 1, len(ids) - 1)]}}"><button type="submit" class="next" aria-label="Next version"{{!' disabled' if position == len(ids) - 1 else ''}}>›</button></form>
</span>
