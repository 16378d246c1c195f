<div class="msg assistant done {{answer['status']}}" id="answer-{{answer['bubble_id']}}" role="article" aria-label="Answer">
% if answer['reasoning']:
  <details class="reasoning"><summary>Reasoning</summary><div class="reasoning-text">{{answer['reasoning']}}</div></details>
% end
% if answer_html:
  <div class="content markdown" hx-disable>{{!answer_html}}</div>
  <template class="source">{{answer['text']}}</template>
% end
% for note in answer['notes']:
  <p class="note">{{note}}</p>
% end
% if answer['error']:
  <p class="error" role="alert">{{error}}</p>
%   if error != answer['error']:
  <details class="error-details"><summary>The server's whole message</summary><pre tabindex="0">{{answer['error']}}</pre></details>
%   end
% end
  <div class="actions">
    {{!nav}}
% if answer_html:
    <button type="button" class="copy" data-copy="answer" aria-label="Copy answer">Copy</button>
% end
% if answer['conversation_id'] and last:
    <form method="post" action="/c/{{answer['conversation_id']}}/regenerate" hx-post="/c/{{answer['conversation_id']}}/regenerate" hx-target="#chat-messages" hx-swap="innerHTML"><input type="hidden" name="message" value="{{answer['bubble_id'][1:]}}"><button type="submit" class="regenerate" aria-label="Regenerate this answer">Regenerate</button></form>
% end
% if answer.get('created'):
    {{!moment(answer['created'])}}
% end
% if answer['conversation_id'] and last and answer.get('message_id') and answer['finish_reason'] == 'length' and answer['status'] == 'done':
    <form method="post" action="/c/{{answer['conversation_id']}}/continue" hx-post="/c/{{answer['conversation_id']}}/continue" hx-target="#chat-messages" hx-swap="innerHTML"><input type="hidden" name="message" value="{{answer['message_id']}}"><button type="submit" class="continue" aria-label="Continue">Continue</button></form>
% end
    <span class="footer">{{answer['footer']}}</span>
  </div>
</div>
