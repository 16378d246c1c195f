<p class="error" role="alert">{{message}}
% if get("reload"):
<a href="{{reload}}">Reload</a>
% end
</p>
