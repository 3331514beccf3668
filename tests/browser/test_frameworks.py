"""Each framework preset's example (examples/frameworks) in Chromium, through the gateway:
it starts from its preset, renders, and a click round-trips to the app's server and back
(over the proxied WebSocket for Bokeh, Panel, Streamlit and Voila; over HTTP for Dash)."""

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def stack(launch_up):
    return launch_up(apps=(ROOT / "examples" / "frameworks",))


@pytest.mark.parametrize("framework", ["bokeh", "panel", "dash", "streamlit", "voila"])
def test_the_presets_example_renders_and_a_click_round_trips(stack, page, framework):
    page.goto(f"{stack['url']}/demo#frameworks/{framework}")
    frame = page.wait_for_selector("#stage iframe", timeout=90_000).content_frame()
    frame.get_by_text("clicks: 0").wait_for(timeout=60_000)
    frame.get_by_role("button", name="Click").click()
    frame.get_by_text("clicks: 1").wait_for()
