"""The demo page in Chromium, against `spinyard up` with the examples: an app embedded through
/embed.js, heartbeats only from an attended page, a run form, and a start failure.

One stack serves the module; each test has its own browser context (and so its own
session, one per tab).
"""

import json
import time

import pytest

from tests.helpers import APPS
from tests.upstack import EXAMPLES

# Records every text the embed's status box and the run form's state show, in order.
RECORD_TEXTS = """
window.__seen = [];
new MutationObserver(() => {
  document.querySelectorAll('.spinyard-status, .run-state .state').forEach((el) => {
    const text = el.firstChild ? el.firstChild.textContent : '';
    if (text && window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
  });
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


@pytest.fixture(scope="module")
def stack(launch_up):
    return launch_up(apps=(*EXAMPLES, APPS / "broken"))


def seen(page) -> list[str]:
    return page.evaluate("window.__seen")


def test_the_demo_embeds_an_app_shows_progress_then_swaps_in_its_iframe(stack, page):
    page.add_init_script(RECORD_TEXTS)
    failed = []
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
    page.goto(f"{stack['url']}/demo#demo/hello")
    frame = page.wait_for_selector("#stage iframe").content_frame()
    frame.wait_for_selector("text=Hello from spinyard")
    assert failed == []  # the favicon included
    # The snippet to copy works elsewhere: it carries a token and says what else it needs.
    snippet = page.text_content("#snippet")
    assert 'data-token="TOKEN"' in snippet and "embed_origins" in snippet
    # The status box said what was happening before the app took its place.
    assert any(text.startswith("Loading demo/hello") for text in seen(page)), seen(page)
    assert page.locator(".spinyard-status").is_hidden()
    # The app answers through the gateway's proxy: a click round-trips.
    before = int(frame.text_content("#n"))
    frame.click("#b")
    frame.wait_for_function(f"document.getElementById('n').textContent === '{before + 1}'")


def test_a_start_failure_shows_its_reason_and_the_apps_last_words(stack, page):
    page.goto(f"{stack['url']}/demo#test/broken")
    box = page.locator(".spinyard-status")
    box.get_by_text("test/broken failed").wait_for()
    text = box.text_content()
    assert "exited with code 3" in text, text
    assert "no data file: lesson.csv" in box.locator("pre").text_content()
    assert box.get_by_role("button", name="Start again").is_visible()


def test_start_again_right_after_a_failure_waits_for_the_new_attempt(stack, page):
    # The stream opened by "Start again" first sends the failure just shown: that is history,
    # however recent; the box shows the new attempt's own outcome (its log tail differs).
    page.goto(f"{stack['url']}/demo#test/broken")
    box = page.locator(".spinyard-status")
    box.get_by_text("test/broken failed").wait_for()
    first_tail = box.locator("pre").text_content()
    box.get_by_role("button", name="Start again").click()
    page.wait_for_function(
        "(old) => { const pre = document.querySelector('.spinyard-status pre');"
        " return pre && pre.textContent !== old; }",
        arg=first_tail,
        timeout=20_000,
    )
    assert "no data file: lesson.csv" in box.locator("pre").text_content()


def test_a_run_form_shows_the_runs_states_and_its_results(stack, page):
    page.add_init_script(RECORD_TEXTS)
    page.goto(f"{stack['url']}/demo#demo/epidemic")
    page.get_by_role("button", name="Run").click()
    page.wait_for_function(
        "document.querySelector('.run-state .state')?.textContent === 'succeeded'"
    )
    states = [s for s in seen(page) if s in ("queued", "running", "succeeded")]
    # Each status in order, none skipped backwards; the form saw the run before its end.
    order = ["queued", "running", "succeeded"]
    assert states == sorted(set(states), key=order.index) and len(states) >= 2, seen(page)
    links = page.locator(".run-state a")
    assert sorted(links.all_text_contents()) == ["summary.json", "trajectory.csv"]
    summary = page.request.get(links.filter(has_text="summary.json").get_attribute("href"))
    assert summary.ok and json.loads(summary.text())["peak_day"] > 0
    # The results are shown, not only linked: the JSON pretty-printed, the CSV as a table
    # of its first rows and, as the app declares, a chart of three columns by day.
    shown = page.locator(".spinyard-result")
    pretty = shown.filter(has_text="summary.json").locator("pre")
    pretty.wait_for()
    assert json.loads(pretty.text_content()) == json.loads(summary.text())
    assert '\n  "peak_day"' in pretty.text_content()
    table = shown.filter(has_text="trajectory.csv").locator("table")
    table.wait_for()
    assert table.locator("th").all_text_contents() == [
        "day",
        "susceptible",
        "infected",
        "recovered",
    ]
    assert table.locator("tr").count() == 21 and "first 20 of 161 rows" in table.text_content()
    lines = shown.locator("svg polyline")
    assert [lines.nth(i).get_attribute("data-series") for i in range(lines.count())] == [
        "susceptible",
        "infected",
        "recovered",
    ]


# Drive the page's attention: Playwright's headless pages are always visible and
# focused, so the test sets what the browser would report for a hidden tab or a window
# in the background.
ATTENTION = """([visible, focused]) => {
  Object.defineProperty(document, 'visibilityState',
    { configurable: true, get: () => (visible ? 'visible' : 'hidden') });
  document.hasFocus = () => focused;
}"""

EMBED = """() => {
  const holder = document.createElement('div');
  holder.setAttribute('data-spinyard-app', 'demo/hello');
  holder.setAttribute('data-heartbeat-s', '0.2');
  holder.setAttribute('data-input-window-s', '1.5');
  document.getElementById('stage').replaceChildren(holder);
  window.spinyard.embed(holder);
}"""


def test_heartbeats_go_only_from_a_visible_focused_page_whose_viewer_acts(stack, page):
    beats: list[float] = []

    def on_request(request):
        if request.method == "POST" and request.url.endswith("/v1/events"):
            if json.loads(request.post_data)["type"] == "heartbeat":
                beats.append(time.monotonic())

    page.on("request", on_request)
    page.goto(f"{stack['url']}/demo")
    page.wait_for_selector("#apps button")  # the dev token is in hand
    page.evaluate(EMBED)
    page.wait_for_selector("#stage iframe")

    def beats_during(seconds: float, act: bool) -> int:
        start, count = time.monotonic(), len(beats)
        while time.monotonic() - start < seconds:
            if act:
                page.mouse.move(10 + (time.monotonic() * 50) % 200, 10)
            page.wait_for_timeout(100)
        return len(beats) - count

    page.evaluate(ATTENTION, [True, True])
    assert beats_during(1.0, act=True) >= 2  # attended: every 0.2 s
    page.evaluate(ATTENTION, [False, True])
    assert beats_during(1.0, act=True) == 0  # a background tab
    page.evaluate(ATTENTION, [True, False])
    assert beats_during(1.0, act=True) == 0  # another window has the focus
    page.evaluate(ATTENTION, [True, True])
    beats_during(0.3, act=True)
    page.wait_for_timeout(1700)  # no input for longer than the input window
    assert beats_during(1.0, act=False) == 0
    assert beats_during(1.0, act=True) >= 2  # the viewer is back
