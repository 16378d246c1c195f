<div class="msg user" role="article" aria-label="You"><div class="bubble">{{prompt}}</div></div>
