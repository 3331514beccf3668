"""The gateway tests' apps, their stand-in backend and `Env`, the running gateway they talk to."""

from dataclasses import dataclass, field

import aiohttp
import msgpack

from dispatcher.backends.secrets import SecretStore
from dispatcher.gateway.app import GatewayRunner, start_gateway
from dispatcher.settings import Settings
from handlers.ports import Backend, Instance
from handlers.state import State
from schemas import subjects
from schemas.codec import encode
from schemas.spec import AppSpec
from schemas.status import AppStatus
from tests.helpers import parse_metrics

VIZ = AppSpec(name="demo/viz", kind="viz", command=["x"], description="A shared viz app")
PER = AppSpec(name="demo/per", kind="viz", sharing="per_session", command=["x"])
JOB = AppSpec(
    name="demo/job", kind="job", command=["x"], description="A model run", max_input_bytes=100
)
INSTANCE = "i-0123456789abcdef"
PUBLISH_SECRET = "p" * 40  # the `gw` fixture's gateway checks tokens signed with it
PREFIX = f"/apps/demo/viz/{INSTANCE}"


class TargetBackend(Backend):
    """A backend that only answers `target()`: the proxy's one question."""

    name = "test"

    def __init__(self) -> None:
        self.targets: dict[str, tuple[str, str]] = {}

    async def target(self, instance_id: str) -> tuple[str, str] | None:
        return self.targets.get(instance_id)

    async def start_viz(self, instance_id, spec, *, pooled=False) -> None:
        raise NotImplementedError

    async def wait_ready(self, instance_id, spec, timeout) -> None:
        raise NotImplementedError

    def url(self, instance_id, spec) -> str:
        raise NotImplementedError

    async def stop_viz(self, instance_id) -> None:
        raise NotImplementedError

    async def claim(self, instance_id) -> None:
        raise NotImplementedError

    async def list_instances(self) -> list[Instance]:
        return []


@dataclass
class Env:
    settings: Settings
    nc: object
    js: object
    state: State
    backend: TargetBackend
    http: aiohttp.ClientSession
    runners: list[GatewayRunner] = field(default_factory=list)
    url: str = ""
    secrets: SecretStore | None = None  # the `sgw` fixture's

    async def start(self, **kwargs) -> GatewayRunner:
        runner = await start_gateway(
            self.settings.gateway, js=self.js, state=self.state, backend=self.backend, **kwargs
        )
        self.runners.append(runner)
        return runner

    async def post(self, event, *, url: str | None = None, **kwargs) -> tuple[int, dict]:
        if isinstance(event, dict | list):
            kwargs.setdefault("json", event)
        else:
            kwargs.setdefault("data", event)
        async with self.http.post(f"{url or self.url}/v1/events", **kwargs) as resp:
            return resp.status, await resp.json()

    async def events_published(self) -> int:
        return (await self.js.stream_info(subjects.EVENTS_STREAM)).state.messages

    async def publish_status(self, subject: str, payload) -> None:
        data = encode(payload) if isinstance(payload, AppStatus) else msgpack.packb(payload)
        await self.js.publish(subject, data)

    async def metrics(self) -> dict[tuple[str, frozenset], float]:
        async with self.http.get(f"{self.url}/metrics") as resp:
            assert resp.status == 200
            return parse_metrics(await resp.text())


def page_load(app="demo/viz", session="s-1", **extra) -> dict:
    return {"type": "page_load", "app": app, "session": session, **extra}
