<input type="hidden" name="parent" id="parent" value="{{leaf or ''}}" hx-swap-oob="true">
