"""`spinyard up`: the whole embedded stack in one process tree.

It starts a nats-server (store under the data dir), an S3 server for run
results (moto, unless `SPINYARD_STORE__*` names one), the local backend,
every handler and the gateway; registers the app specs it finds; makes a dev
signing secret and prints a ready-to-use token. On Ctrl-C or SIGTERM it stops
the handlers, the gateway, every app instance and run it started, the S3
server and the nats-server, in that order, leaving no process behind.

While it runs, a supervisor restarts the nats-server (same port, same store)
if it dies (dispatcher/embedded/supervisor.py), within `embedded.*` bounds.
"""

import asyncio
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

from pydantic import SecretStr

from dispatcher import compose, logs
from dispatcher.bus import permissions
from dispatcher.bus.provision import open_state
from dispatcher.embedded.natsserver import NatsServer
from dispatcher.embedded.s3server import S3Server
from dispatcher.embedded.specs import Registered, find_specs, register
from dispatcher.embedded.supervisor import supervise
from dispatcher.gateway.auth import mint, new_secret
from dispatcher.metrics import new_registry
from dispatcher.settings import Settings
from handlers.ports import Backend
from handlers.registry import default_registry

log = logs.get("spinyard.up")


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


def as_user(settings: Settings, role: str, passwords: dict[str, str]) -> Settings:
    """A copy of `settings` whose NATS login is `role`'s."""
    login = {"user": role, "password": SecretStr(passwords[role])}
    return settings.model_copy(update={"nats": settings.nats.model_copy(update=login)})


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
        f"SPINYARD_NATS__USER={permissions.ADMIN}",
        f"SPINYARD_NATS__PASSWORD={admin_password}",
    ]
    if hs256_secret is not None:
        lines.append(f"SPINYARD_AUTH__HS256_SECRET={hs256_secret.get_secret_value()}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _earlier(apps: Registered) -> str:
    """The banner's line on apps registered by earlier runs: kept, or removed by --fresh."""
    if apps.kept:
        return f"  kept:    {', '.join(apps.kept)} (registered earlier; --fresh removes them)\n"
    if apps.removed:
        return f"  removed: {', '.join(apps.removed)} (registered earlier; --fresh)\n"
    return ""


async def _cancelled(task: asyncio.Task) -> None:
    """Cancel `task` and wait for it (whatever it raised is read later, not here)."""
    task.cancel()
    await asyncio.wait([task])


class Stack:
    """The embedded stack. `run()` until `stop()`."""

    def __init__(
        self,
        settings: Settings,
        app_dirs: list[Path],
        port: int | None = None,
        fresh: bool = False,
    ):
        self.settings = settings
        self.app_dirs = app_dirs
        self.fresh = fresh
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
            # (dispatcher/bus/permissions.py), with passwords made for this run.
            passwords = {role: new_secret() for role in permissions.ROLES}
            nats_server = NatsServer(data_dir / "nats", config=permissions.server_config(passwords))
            nats_server.start()
            stack.callback(nats_server.stop)
            settings.nats.url = nats_server.url
            limits = settings.embedded
            supervisor = asyncio.create_task(
                supervise(
                    nats_server,
                    limits.nats_restarts,
                    limits.nats_restart_window_s,
                    limits.nats_restart_delay_s,
                ),
                name="nats-supervisor",
            )
            stack.push_async_callback(_cancelled, supervisor)  # before the server stops

            if settings.store.access_key is None:
                s3 = S3Server().start()
                stack.callback(s3.stop)
                settings.store.endpoint = s3.endpoint
                settings.store.access_key = SecretStr(DEV_S3_ACCESS_KEY)
                settings.store.secret_key = SecretStr(DEV_S3_SECRET_KEY)
            store = await stack.enter_async_context(compose.object_store(settings))

            if settings.auth.enabled and settings.auth.hs256_secret is None:
                settings.auth.hs256_secret = SecretStr(dev_secret(data_dir))
            settings.auth.dev_token_endpoint = True
            cli_env = write_cli_env(
                data_dir, nats_server.url, passwords[permissions.ADMIN], settings.auth.hs256_secret
            )

            compose.pick_gateway_port(settings)
            backend = await stack.enter_async_context(compose.backend(settings))
            stack.push_async_callback(stop_all_instances, backend)

            as_handler = as_user(settings, permissions.HANDLER, passwords)
            nc = await stack.enter_async_context(
                compose.nats_client(as_handler, "spinyard-up-handlers")
            )
            specs = default_registry.select(None)
            state = await compose.provision(nc.jetstream(), settings, specs)
            paths = [p for d in self.app_dirs for p in find_specs(d)]
            apps = await register(state, paths, fresh=self.fresh)

            as_gateway = as_user(settings, permissions.GATEWAY, passwords)
            gateway_nc = await stack.enter_async_context(
                compose.nats_client(as_gateway, "spinyard-up-gateway")
            )
            gateway_js = gateway_nc.jetstream()
            gateway_state = await open_state(gateway_js)
            # One Prometheus registry for the process: the gateway's /metrics shows the
            # handlers' metrics too (their own health port is off unless configured).
            registry = new_registry()
            secrets = await stack.enter_async_context(compose.secret_store(settings))
            await stack.enter_async_context(
                compose.gateway(
                    settings, gateway_js, gateway_state, backend, metrics=registry, secrets=secrets
                )
            )
            handlers = await stack.enter_async_context(
                compose.handlers(
                    settings, nc, state, backend=backend, store=store, metrics=registry
                )
            )

            self.url = settings.gateway.base_url
            self.token = self._dev_token()
            announce(
                f"spinyard is up.\n"
                f"  demo:    {self.url}/demo\n"
                f"  API:     {self.url}/v1/apps\n"
                f"  NATS:    {nats_server.url} (users admin, gateway, handler)\n"
                f"  CLI:     set -a; . {cli_env}; set +a   # then: spinyard apps list\n"
                f"  S3:      {settings.store.endpoint} (bucket {settings.store.bucket})\n"
                f"  apps:    {', '.join(s.name for s in apps.specs) or 'none'}\n"
                f"{_earlier(apps)}"
                f"  token:   {self.token or '(auth disabled)'}\n"
                f"           (all apps, 12 h; use as 'Authorization: Bearer <token>')\n"
                f"Press Ctrl-C to stop."
            )
            self.ready.set()
            stopper = asyncio.create_task(self._stop.wait(), name="stop-waiter")
            died = asyncio.create_task(handlers.stopping.wait(), name="handlers-stopped")
            await asyncio.wait([died, stopper, supervisor], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            died.cancel()
        log.info("stack_stopped")
        if supervisor.done() and not supervisor.cancelled() and supervisor.exception():
            raise supervisor.exception()  # it gave up restarting the nats-server

    def _dev_token(self) -> str:
        """A token for every app, 12 h, from the stack's secret ('' with auth off)."""
        auth = self.settings.auth
        if auth.hs256_secret is None:
            return ""
        return mint(
            auth.hs256_secret.get_secret_value(),
            ["*"],
            subject="dev",
            ttl_s=12 * 3600,
            audience=auth.audience,
            issuer=auth.issuer,
        )
