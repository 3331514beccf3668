"""Panel: a button whose clicks the server counts."""

import panel as pn

button = pn.widgets.Button(name="Click", button_type="primary")
pn.Column(button, pn.bind(lambda n: f"clicks: {n}", button.param.clicks)).servable(title="panel")
