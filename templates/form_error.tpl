<p class="error" role="alert">{{message}}</p>
