    <div class="presets" id="presets-picker">
% if presets:
      <label for="preset">Preset</label>
      <select name="preset" id="preset" form="presets">
% for p in presets:
        <option value="{{p['name']}}"{{!' selected' if p['name'] == chosen else ''}}>{{p['name']}}</option>
% end
      </select>
      <button type="submit" form="presets">Use</button>
      <button type="submit" form="presets" formmethod="post" formaction="/presets/delete" hx-post="/presets/delete" hx-include="#preset" hx-target="#presets-picker" hx-swap="outerHTML" aria-label="Delete this preset">Delete</button>
% end
      <label for="preset-name">Save these options as a preset</label>
      <input type="text" name="preset_name" id="preset-name" maxlength="80" placeholder="Preset name" autocomplete="off">
      <button type="submit" class="save-preset" formaction="/presets" formenctype="application/x-www-form-urlencoded" formnovalidate hx-post="/presets" hx-target="#presets-picker" hx-swap="outerHTML">Save preset</button>
    </div>
