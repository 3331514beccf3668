"""`spinyard up`: the whole embedded stack in one process tree.

It starts a nats-server (store under the data dir), an S3 server for run
results (moto, unless `SPINYARD_STORE__*` names one), the local backend,
every handler and the gateway; registers the app specs it finds; makes a dev
signing secret and prints a ready-to-use token. On Ctrl-C or SIGTERM it stops
the handlers, the gateway, every app instance and run it started, the S3
server and the nats-server, in that order, leaving no process behind.
"""

import asyncio
import socket
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

from pydantic import SecretStr

from dispatcher import bus, logs, natsauth
from dispatcher.apps import find_specs, register
from dispatcher.auth import Authenticator, mint, new_secret
from dispatcher.backends.base import make_backend
from dispatcher.gateway.app import start_gateway
from dispatcher.gateway.security import Guard
from dispatcher.natsserver import NatsServer
from dispatcher.runtime import Handlers
from dispatcher.s3server import S3Server
from dispatcher.settings import NatsSettings, Settings
from dispatcher.store import ObjectStore
from handlers.ports import Backend
from handlers.state import State
from schemas import subjects

log = logs.get("spinyard.up")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def stop_all_instances(backend: Backend) -> None:
    """Stop every instance the backend runs for spinyard (used when `up` exits)."""
    instances = await backend.list_instances()
    await asyncio.gather(*(backend.stop_viz(i.id) for i in instances if i.kind == "viz"))
    for job in (i for i in instances if i.kind == "job"):
        await backend.cancel_job(job.id)
    if instances:
        log.info("instances_stopped", count=len(instances))


DEV_S3_ACCESS_KEY = "spinyard-dev"
DEV_S3_SECRET_KEY = "spinyard-dev-secret"  # moto checks no signatures; this only fills the field


def dev_secret(data_dir: Path) -> str:
    """The embedded stack's HS256 secret: made once, kept (0600) in the data dir."""
    path = data_dir / "dev-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(new_secret())
    return path.read_text().strip()


def as_user(nats: NatsSettings, role: str, passwords: dict[str, str]) -> NatsSettings:
    """`nats` settings that log in as `role`."""
    return nats.model_copy(update={"user": role, "password": SecretStr(passwords[role])})


def write_cli_env(
    data_dir: Path, url: str, admin_password: str, hs256_secret: SecretStr | None
) -> Path:
    """An env file (0600) that points the CLI at this stack, as NATS's admin user,
    with the stack's token secret so `spinyard token` mints tokens it accepts."""
    path = data_dir / "cli.env"
    path.touch(mode=0o600)
    path.chmod(0o600)
    lines = [
        f"SPINYARD_NATS__URL={url}",
        f"SPINYARD_NATS__USER={natsauth.ADMIN}",
        f"SPINYARD_NATS__PASSWORD={admin_password}",
    ]
    if hs256_secret is not None:
        lines.append(f"SPINYARD_AUTH__HS256_SECRET={hs256_secret.get_secret_value()}")
    path.write_text("\n".join(lines) + "\n")
    return path


async def open_gateway_state(js) -> State:
    """The KV buckets the gateway reads, opened without creating anything (its role may not)."""
    apps, deployments, jobs = [
        await js.key_value(bucket)
        for bucket in (subjects.APPS_BUCKET, subjects.DEPLOYMENTS_BUCKET, subjects.JOBS_BUCKET)
    ]
    return State(apps, deployments, None, jobs)  # type: ignore[arg-type]


class Stack:
    """The embedded stack. `run()` until `stop()`."""

    def __init__(self, settings: Settings, app_dirs: list[Path], port: int | None = None):
        self.settings = settings
        self.app_dirs = app_dirs
        if port is not None:
            settings.gateway.port = port
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.url: str | None = None
        self.token: str | None = None

    def stop(self) -> None:
        self._stop.set()

    async def run(self, announce: Callable[[str], None] = lambda _: None) -> None:
        settings = self.settings
        data_dir = settings.data_dir.resolve()
        settings.data_dir = data_dir
        async with AsyncExitStack() as stack:
            # NATS users and permissions are the same as on Kubernetes
            # (dispatcher/natsauth.py), with passwords made for this run.
            passwords = {role: new_secret() for role in natsauth.ROLES}
            nats_server = NatsServer(data_dir / "nats", config=natsauth.server_config(passwords))
            nats_server.start()
            stack.callback(nats_server.stop)
            settings.nats.url = nats_server.url
            handler_nats = as_user(settings.nats, natsauth.HANDLER, passwords)
            gateway_nats = as_user(settings.nats, natsauth.GATEWAY, passwords)

            if settings.store.access_key is None:
                s3 = S3Server().start()
                stack.callback(s3.stop)
                settings.store.endpoint = s3.endpoint
                settings.store.access_key = SecretStr(DEV_S3_ACCESS_KEY)
                settings.store.secret_key = SecretStr(DEV_S3_SECRET_KEY)
            store = ObjectStore(settings.store)
            await store.setup()
            stack.push_async_callback(store.close)

            if settings.auth.enabled and settings.auth.hs256_secret is None:
                settings.auth.hs256_secret = SecretStr(dev_secret(data_dir))
            settings.auth.dev_token_endpoint = True
            cli_env = write_cli_env(
                data_dir, nats_server.url, passwords[natsauth.ADMIN], settings.auth.hs256_secret
            )

            gw = settings.gateway
            if gw.port == 0:
                gw.port = free_port(gw.host)
            gw.public_url = gw.public_url or f"http://{gw.host}:{gw.port}"
            backend = make_backend(settings)
            await backend.setup()
            stack.push_async_callback(backend.cleanup)
            stack.push_async_callback(stop_all_instances, backend)

            nc = await bus.connect(handler_nats, name="spinyard-up-handlers")
            stack.push_async_callback(nc.drain)
            handlers = Handlers(settings, backend=backend, nc=nc, store=store)
            js = nc.jetstream()
            state = await bus.ensure(js, settings.nats, handlers.specs, settings.handlers)
            paths = [p for d in self.app_dirs for p in find_specs(d)]
            specs = await register(state, paths)

            handlers_task = asyncio.create_task(handlers.run(), name="handlers")
            gateway_nc = await bus.connect(gateway_nats, name="spinyard-up-gateway")
            stack.push_async_callback(gateway_nc.drain)
            gateway_js = gateway_nc.jetstream()
            gateway_state = await open_gateway_state(gateway_js)
            guard = Guard(settings.auth, gateway_state, gw.public_url)
            runner = await start_gateway(
                gw, js=gateway_js, state=gateway_state, backend=backend, guard=guard
            )
            stack.push_async_callback(runner.cleanup)
            await handlers.ready.wait()

            self.url = gw.public_url
            token = ""
            if settings.auth.hs256_secret is not None:
                secret = settings.auth.hs256_secret.get_secret_value()
                token = mint(
                    secret,
                    ["*"],
                    subject="dev",
                    ttl_s=12 * 3600,
                    audience=settings.auth.audience,
                    issuer=settings.auth.issuer,
                )
            self.token = token
            announce(
                f"spinyard is up.\n"
                f"  demo:    {gw.public_url}/demo\n"
                f"  API:     {gw.public_url}/v1/apps\n"
                f"  NATS:    {nats_server.url} (users admin, gateway, handler)\n"
                f"  CLI:     set -a; . {cli_env}; set +a   # then: spinyard apps list\n"
                f"  S3:      {settings.store.endpoint} (bucket {settings.store.bucket})\n"
                f"  apps:    {', '.join(s.name for s in specs) or 'none'}\n"
                f"  token:   {token or '(auth disabled)'}\n"
                f"           (all apps, 12 h; use as 'Authorization: Bearer <token>')\n"
                f"Press Ctrl-C to stop."
            )
            self.ready.set()
            stopper = asyncio.create_task(self._stop.wait(), name="stop-waiter")
            await asyncio.wait([handlers_task, stopper], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            handlers.stop()
            await handlers_task
        log.info("stack_stopped")


async def run_gateway_only(
    settings: Settings, stop: asyncio.Event, announce: Callable[[str], None] = lambda _: None
) -> None:
    """Run just the gateway against the configured NATS (for `spinyard gateway`).

    It creates nothing on JetStream (its NATS role may not): it opens the
    buckets it reads, and the handlers create the rest. It proxies apps only
    for the local backend; on Kubernetes the ingress routes to them.
    """
    Authenticator(settings.auth)  # a missing or weak key is an error before anything starts
    async with AsyncExitStack() as stack:
        backend = None
        if settings.backend.kind == "local":
            backend = make_backend(settings)
            await backend.setup()
            stack.push_async_callback(backend.cleanup)
        nc = await bus.connect(settings.nats, name="spinyard-gateway")
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        state = await open_gateway_state(js)
        public_url = settings.gateway.public_url or (
            f"http://{settings.gateway.host}:{settings.gateway.port}"
        )
        guard = Guard(settings.auth, state, public_url)
        runner = await start_gateway(
            settings.gateway, js=js, state=state, backend=backend, guard=guard
        )
        stack.push_async_callback(runner.cleanup)
        announce(f"gateway listening on {runner.url}")
        await stop.wait()
