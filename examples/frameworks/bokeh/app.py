"""Bokeh: a button whose clicks the server counts (its callback runs in the server)."""

from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import Button, Div

clicks = Div(text="clicks: 0", name="clicks")
button = Button(label="Click", button_type="primary")


def clicked() -> None:
    clicks.text = f"clicks: {int(clicks.text.split()[-1]) + 1}"


button.on_click(clicked)
curdoc().add_root(column(button, clicks))
curdoc().title = "bokeh preset"
