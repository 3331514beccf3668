"""A page past an app's `max_instances` in Chromium: embed.js says it waits and where, then
swaps in the app once the viewer ahead has gone. Against `spinyard up` with one test app."""

import pytest

from tests.helpers import APPS

APP = "test/limited"  # per_session, max_instances: 1, reaped 3 s after its last heartbeat

EMBED = """(app) => {
  const holder = document.createElement('div');
  holder.setAttribute('data-spinyard-app', app);
  holder.setAttribute('data-heartbeat-s', '0.5');
  document.getElementById('stage').replaceChildren(holder);
  window.spinyard.embed(holder);
}"""


@pytest.fixture(scope="module")
def stack(launch_up):
    return launch_up(apps=(APPS / "limited",))


def embed(page, url: str) -> None:
    page.goto(f"{url}/demo")
    page.wait_for_selector("#apps button")  # the dev token is in hand
    page.evaluate(EMBED, APP)


def test_a_viewer_past_the_limit_sees_its_place_then_the_app(stack, browser, page):
    embed(page, stack["url"])  # the first viewer (its own tab: its own session)
    page.wait_for_selector("#stage iframe").content_frame().wait_for_selector(
        "text=Hello from spinyard"
    )
    second = browser.new_context()
    try:
        waiting = second.new_page()
        waiting.set_default_timeout(30_000)
        embed(waiting, stack["url"])
        box = waiting.locator(".spinyard-status")
        box.get_by_text(f"Waiting for {APP} (number 1 in line)").wait_for()
        assert waiting.locator("#stage iframe").count() == 0
        page.context.close()  # the first viewer leaves: no more heartbeats, reaped in 3 s
        frame = waiting.wait_for_selector("#stage iframe").content_frame()
        frame.wait_for_selector("text=Hello from spinyard")
        assert box.is_hidden()
    finally:
        second.close()
