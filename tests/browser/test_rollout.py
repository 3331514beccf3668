"""embed.js across an update, in Chromium against `spinyard up`: a viewer keeps the instance
they have while a new viewer gets the new revision, and their heartbeats name their instance
(docs/publishing.md, "What an update does")."""

import json
import re
import urllib.request

import pytest

from dispatcher.gateway.auth import mint
from tests.helpers import APPS

APP = "demo/roll"

EMBED = """(app) => {
  const holder = document.createElement('div');
  holder.setAttribute('data-spinyard-app', app);
  holder.setAttribute('data-heartbeat-s', '0.2');
  document.getElementById('stage').replaceChildren(holder);
  window.spinyard.embed(holder);
}"""


@pytest.fixture(scope="module")
def stack(launch_up):
    return launch_up(apps=())


def publish(stack: dict, tag: str) -> int:
    """PUT an echo app whose command carries `tag`, with a publisher token; its revision."""
    secret = (stack["data"] / "dev-secret").read_text().strip()
    token = mint(secret, [], publish=["demo"], subject="browser-test")
    spec = {
        "command": ["{python}", str(APPS / "echo_app.py"), "--tag", tag],
        "embed_origins": ["'self'"],
        "start_timeout_s": 20,
    }
    request = urllib.request.Request(
        f"{stack['url']}/v1/apps/{APP}",
        data=json.dumps(spec).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())["revision"]


def shown_instance(page) -> str:
    src = page.wait_for_selector("#stage iframe").get_attribute("src")
    return re.search(r"/apps/demo/roll/(i-[a-z0-9]+)/", src).group(1)


def open_viewer(stack, page, beats: list[dict] | None = None) -> str:
    if beats is not None:

        def on_request(request):
            if request.method == "POST" and request.url.endswith("/v1/events"):
                event = json.loads(request.post_data)
                if event["type"] == "heartbeat":
                    beats.append(event)

        page.on("request", on_request)
    page.goto(f"{stack['url']}/demo")
    page.wait_for_selector("#apps button")  # the dev token is in hand
    page.evaluate(EMBED, APP)
    return shown_instance(page)


def test_a_viewer_keeps_their_instance_after_an_update_and_names_it(stack, browser, page):
    assert publish(stack, "v1") == 1
    beats: list[dict] = []
    old = open_viewer(stack, page, beats)
    assert publish(stack, "v2") == 2
    # No wait: the handlers' spec memory drops the old spec as the watch sees the update.

    other = browser.new_context()
    try:
        second = other.new_page()
        second.set_default_timeout(30_000)
        open_viewer(stack, second)  # it may show the status held from before its load first
        second.wait_for_function(
            f"(document.querySelector('#stage iframe')?.src || '{old}').includes('{old}') === false"
        )
        new = shown_instance(second)
    finally:
        other.close()
    assert new != old
    # The first viewer's page saw the new instance's statuses, and stayed where it was.
    seen = len(beats)
    page.wait_for_timeout(1500)
    assert shown_instance(page) == old
    after = beats[seen:]
    assert after and all(beat["instance"] == old for beat in after), after
    assert page.locator(".spinyard-status").is_hidden()
