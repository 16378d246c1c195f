<div class="msg user"><div class="bubble">{{prompt}}</div></div>
