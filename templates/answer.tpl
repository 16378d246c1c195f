<div class="msg assistant done {{status}}" id="answer-{{stream_id}}">
% if reasoning:
  <details class="reasoning"><summary>Reasoning</summary><div class="reasoning-text">{{reasoning}}</div></details>
% end
% if answer_html:
  <div class="content markdown" hx-disable>{{!answer_html}}</div>
  <template class="source">{{source}}</template>
% end
% for note in notes:
  <p class="note">{{note}}</p>
% end
% if error:
  <p class="error" role="alert">{{error}}</p>
% end
  <div class="actions">
% if answer_html:
    <button type="button" class="copy" data-copy="answer" aria-label="Copy answer">Copy</button>
% end
    <span class="footer">{{footer}}</span>
  </div>
</div>
