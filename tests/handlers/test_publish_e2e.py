"""Publishing end to end: an app published over HTTP serves a page load, and removing it over
HTTP stops its instance with reason `app_removed`. Real nats-server, handlers, app process."""

import aiohttp

from dispatcher.gateway.app import start_gateway
from dispatcher.gateway.auth import mint
from dispatcher.gateway.security import Guard
from dispatcher.settings import AuthSettings
from schemas import subjects
from tests.handlers.test_viz_lifecycle import HELLO, running_stack
from tests.helpers import wait_for

SECRET = "e" * 40


async def test_published_app_serves_and_a_delete_stops_it_as_app_removed(settings):
    async with running_stack(settings) as stack:
        guard = Guard(AuthSettings(hs256_secret=SECRET), stack.state, "http://gw")
        runner = await start_gateway(
            settings.gateway, js=stack.js, state=stack.state, backend=None, guard=guard
        )
        token = mint(SECRET, [], publish=["demo"], subject="e2e")
        url = f"{runner.url}/v1/apps/demo/hello"
        spec = {
            "command": ["{python}", "app.py"],
            "workdir": str(HELLO),
            "readiness_path": "/healthz",
            "start_timeout_s": 15,
        }
        try:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
                async with http.put(url, json=spec) as resp:
                    assert resp.status == 201, await resp.text()
                await stack.page_load("demo/hello")
                subject = subjects.app_status("demo/hello")
                await stack.wait_state(subject, "ready")
                assert len(await stack.viz_instances()) == 1

                async with http.delete(url) as resp:
                    assert resp.status == 204
                stopped = await stack.wait_state(subject, "stopped", timeout=20)
                assert stopped["reason"] == "app_removed"
                await wait_for(lambda: _none_alive(stack), timeout=10, what="the instance to stop")
                history = await stack.state.revisions.get("demo/hello")
                assert history.current == 0 and history.last == 1  # kept, none current
        finally:
            await runner.cleanup()


async def _none_alive(stack) -> bool:
    return await stack.viz_instances() == []
