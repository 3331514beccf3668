"""Bokeh server app: a sine wave shaped by sliders (needs the `demo` extra)."""

import numpy as np
from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, Slider
from bokeh.plotting import figure

x = np.linspace(0, 4 * np.pi, 400)
source = ColumnDataSource(data={"x": x, "y": np.sin(x)})
plot = figure(height=360, width=640, title="y = a sin(f x + p)", y_range=(-5, 5))
plot.line("x", "y", source=source, line_width=3)

amplitude = Slider(title="amplitude a", value=1.0, start=0.1, end=5.0, step=0.1)
frequency = Slider(title="frequency f", value=1.0, start=0.1, end=5.0, step=0.1)
phase = Slider(title="phase p", value=0.0, start=0.0, end=2 * np.pi, step=0.1)


def update(attr, old, new):
    source.data = {"x": x, "y": amplitude.value * np.sin(frequency.value * x + phase.value)}


for slider in (amplitude, frequency, phase):
    slider.on_change("value", update)

curdoc().add_root(column(plot, amplitude, frequency, phase))
curdoc().title = "sliders"
