"""Secrets end to end on the local backend: set over HTTP, named by a published spec, in the
app's environment, and nowhere else: not on NATS (every message, KV included, seen by a `>`
subscription), not in the KV buckets, the status, the logs or the metrics. A spec naming a
secret that is not set fails its start `missing_secret`, by name. Real nats-server, handlers,
gateway and app process."""

import contextlib

import aiohttp
import nats.js.errors
from structlog.testing import capture_logs

from dispatcher.backends.local.secrets import SecretFiles
from dispatcher.gateway.app import start_gateway
from dispatcher.gateway.auth import mint
from dispatcher.gateway.security import Guard
from dispatcher.settings import AuthSettings
from schemas import subjects
from tests.backends.contract import ECHO_APP
from tests.handlers.test_viz_lifecycle import running_stack

KEY = "e" * 40
APP = "alice/echo"
VALUE = "pg://alice:" + "Zq7-" * 6 + "@db.internal/app"
SPEC = {
    "command": ["{python}", str(ECHO_APP), "--port", "{port}", "--prefix", "{prefix}"],
    "secrets": ["APP_DB_URL"],
    "start_timeout_s": 15,
}


async def test_a_secret_reaches_the_apps_environment_and_nothing_else(settings):
    seen_on_nats: list[bytes] = []
    with capture_logs() as logs:
        async with running_stack(settings) as stack, _gateway(settings, stack) as (url, http):
            everything = await stack.nc.subscribe(">", cb=_keep(seen_on_nats))
            async with http.put(f"{url}/v1/apps/{APP}/secrets/APP_DB_URL", data=VALUE) as resp:
                assert resp.status == 201, await resp.text()
            async with http.put(f"{url}/v1/apps/{APP}", json=SPEC) as resp:
                assert resp.status == 201, await resp.text()
            await stack.page_load(APP)
            ready = await stack.wait_state(subjects.app_status(APP), "ready")
            _, base = await stack.backend.target(ready["instance"])
            async with http.get(f"{base}/apps/{APP}/{ready['instance']}/api/info") as resp:
                assert (await resp.json())["env"]["APP_DB_URL"] == VALUE  # where it belongs
            async with http.get(f"{url}/v1/apps/{APP}/secrets") as resp:
                listed = await resp.read()
            async with http.get(f"{url}/metrics") as resp:
                metrics = await resp.read()
            await stack.nc.flush()
            await everything.unsubscribe()
            kv = [await _bucket(stack.js, name) for name in subjects.BUCKETS]
            statuses = repr(stack.statuses.by_subject).encode()

    secret = VALUE.encode()
    assert any(b"APP_DB_URL" in m for m in seen_on_nats)  # the spec's KV put was seen
    assert not [m for m in seen_on_nats if secret in m]
    assert b"APP_DB_URL" in b"".join(kv)  # the spec names it: the name is no secret
    assert not [b for b in kv if secret in b]
    assert b"ready" in statuses and secret not in statuses
    assert b"APP_DB_URL" in listed and secret not in listed and secret not in metrics
    assert any(e["event"] == "secret_set" and e["name"] == "APP_DB_URL" for e in logs)
    assert VALUE not in repr(logs)
    assert SecretFiles.under(settings.data_dir).read(APP) == {"APP_DB_URL": VALUE}


async def test_a_secret_that_is_not_set_fails_the_start_naming_it(settings):
    with capture_logs() as logs:
        async with running_stack(settings) as stack, _gateway(settings, stack) as (url, http):
            spec = SPEC | {"secrets": ["APP_DB_URL", "APP_NEVER_SET"]}
            await SecretFiles.under(settings.data_dir).put(APP, "APP_DB_URL", VALUE)
            async with http.put(f"{url}/v1/apps/{APP}", json=spec) as resp:
                assert resp.status == 201, await resp.text()
            await stack.page_load(APP)
            failed = await stack.wait_state(subjects.app_status(APP), "failed")
            assert await stack.viz_instances() == []
    assert failed["error"]["code"] == "missing_secret"
    assert "APP_NEVER_SET" in failed["error"]["message"]
    assert VALUE not in repr(failed) and VALUE not in repr(logs)


@contextlib.asynccontextmanager
async def _gateway(settings, stack):
    """A gateway with the local backend's secret store; a client with a publisher token."""
    guard = Guard(AuthSettings(hs256_secret=KEY), stack.state, "http://gw")
    runner = await start_gateway(
        settings.gateway,
        js=stack.js,
        state=stack.state,
        backend=stack.backend,
        guard=guard,
        secrets=SecretFiles.under(settings.data_dir),
    )
    token = mint(KEY, [], publish=["alice"], subject="ci")
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            yield runner.url, http
    finally:
        await runner.cleanup()


def _keep(into: list[bytes]):
    async def keep(msg) -> None:
        into.append(f"{msg.subject} {msg.headers} ".encode() + msg.data)

    return keep


async def _bucket(js, name: str) -> bytes:
    """Every key and value of a KV bucket, history included, as one blob."""
    kv = await js.key_value(name)
    blob = b""
    with contextlib.suppress(nats.js.errors.NoKeysError):  # an empty bucket
        for key in await kv.keys():
            blob += key.encode()
            for entry in await kv.history(key):
                blob += entry.value or b""
    return blob
