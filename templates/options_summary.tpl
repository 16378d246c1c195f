<summary id="options-summary"{{!' hx-swap-oob="true"' if oob else ''}}>Model and options{{' · ' + ', '.join(active) if active else ''}}</summary>
