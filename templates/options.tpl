  <details class="options" id="options"{{!' open' if opened else ''}}>
% include("options_summary", active=active_options(system, params), oob=False)
    <label for="model">Model</label>
% if models:
    <select name="model" id="model">
% else:
    <!-- The model list is asked for in the background; fetch it once it is there. -->
    <select name="model" id="model" hx-get="/model-options" hx-trigger="load" hx-target="this" hx-swap="innerHTML">
% end
% include("model_options", models=models, model=model, label=label)
    </select>
    <label for="system">System prompt</label>
    <textarea name="system" id="system" rows="3" placeholder="Optional instructions for the model in this conversation">{{system}}</textarea>
    <label class="check"><input type="checkbox" name="save_system" value="1"> Use this system prompt for new chats</label>
    <div class="params">
% for name, label_, step, hint in (("temperature", "Temperature", "0.05", "0–2"), ("top_p", "Top p", "0.01", "0–1"), ("max_tokens", "Max tokens", "1", "1 or more")):
      <label>{{label_}}
        <input type="number" name="{{name}}" step="{{step}}" min="0" value="{{'' if params[name] is None else params[name]}}" placeholder="{{'default: ' + str(defaults[name]) if defaults[name] is not None else "server's default"}}" aria-describedby="hint-{{name}}">
        <span class="hint" id="hint-{{name}}">{{hint}}; blank: {{'the default' if defaults[name] is not None else "the server's default"}}</span>
      </label>
% end
    </div>
% include("presets", presets=presets, chosen=chosen)
  </details>
