% for name in models:
      <option value="{{name}}"{{!' selected' if name == model else ''}}>{{label(name)}}</option>
% end
% if model and model not in models:
      <option value="{{model}}" selected>{{label(model)}}</option>
% end
% if not models and not model:
      <option value="">the server's default</option>
% end
