"""The `spinyard` command line: run the stack or one part of it, manage apps, send and watch events.

This is the one module that writes to stdout for people; everything else logs.
"""

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable
from pathlib import Path

from pydantic import ValidationError

from dispatcher import cliargs, logs, publishing, secrets_cli
from dispatcher.backends.local.paths import StateDirError
from dispatcher.bus import NatsUnavailable
from dispatcher.embedded.natsserver import NatsServerError
from dispatcher.settings import Settings, SettingsError


def _settings(args) -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"SPINYARD_{'__'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None
    if getattr(args, "log_level", None):
        settings.log_level = args.log_level
    logs.configure(settings.log_format, settings.log_level)
    return settings


def _cli_nats(settings: Settings):
    """The CLI's NATS connection: one attempt (a person is waiting), drained at the end."""
    from dispatcher.compose import nats_client

    return nats_client(settings, "spinyard-cli", wait_s=0)


def _on_signals(stop) -> None:
    """From now on SIGINT/SIGTERM ask for a graceful stop. (Until a service runs,
    Ctrl-C interrupts at once, even while it is still waiting for NATS.)"""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


async def _cmd_up(args, settings: Settings) -> int:
    from dispatcher.embedded.up import Stack

    stack = Stack(
        settings,
        app_dirs=[Path(d) for d in args.apps] or [Path("examples")],
        port=args.port,
        fresh=args.fresh,
    )

    def stop() -> None:
        # Stopping is routine: its info lines (each consumer, the gateway, ...) would
        # bury the one line a person at the terminal needs. Warnings still show.
        if logging.getLevelName(settings.log_level.upper()) < logging.WARNING:
            logs.configure(settings.log_format, "warning")
        stack.stop()

    _on_signals(stop)
    await stack.run(announce=lambda text: print(text, flush=True))
    print("spinyard stopped", flush=True)
    return 0


async def _cmd_handlers(args, settings: Settings) -> int:
    from dispatcher.compose import serve_handlers

    try:
        await serve_handlers(settings, args.kinds or None, started=lambda s: _on_signals(s.stop))
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    return 0


async def _cmd_gateway(args, settings: Settings) -> int:
    from dispatcher.compose import serve_gateway

    stop = asyncio.Event()

    def listening(runner) -> None:
        print(f"gateway listening on {runner.url}", flush=True)
        _on_signals(stop.set)

    await serve_gateway(settings, stop, started=listening)
    return 0


async def _cmd_apps(args, settings: Settings) -> int:
    from dispatcher.bus.provision import ensure_state
    from dispatcher.embedded.specs import register
    from handlers import revisions

    url = args.gateway or settings.gateway_url
    if url:
        token = settings.token.get_secret_value() if settings.token else None
        return await _print_lines(publishing.run(args, url, token))
    if args.apps_cmd == "rollback":
        print("error: rollback goes through a gateway: give --gateway URL", file=sys.stderr)
        return 2
    async with _cli_nats(settings) as nc:
        state = await ensure_state(nc.jetstream(), settings.nats)
        if args.apps_cmd == "add":
            try:
                specs = (await register(state, [Path(p) for p in args.files])).specs
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            for spec in specs:
                mode = spec.sharing if spec.kind == "viz" else f"deadline {spec.deadline_s:g}s"
                print(f"registered {spec.name} ({spec.kind}, {mode})")
        elif args.apps_cmd == "list":
            for spec in sorted((e.value for e in await state.apps.scan()), key=lambda s: s.name):
                size, windows = spec.pool.size, len(spec.schedule)
                print(publishing.app_line(spec.name, spec.kind, spec.sharing, size, windows))
        elif args.apps_cmd == "rm":
            if await state.apps.get(args.name) is None:
                print(f"error: no app named {args.name!r}", file=sys.stderr)
                return 1
            await state.apps.delete(args.name)
            await state.revisions.change(args.name, revisions.removed)  # history kept
            print(f"removed {args.name}")
        elif args.apps_cmd == "history":
            history = await state.revisions.get(args.name)
            if history is None:
                print(f"error: {args.name!r} was never published over HTTP", file=sys.stderr)
                return 1
            for line in publishing.history_lines(history.model_dump(mode="json")):
                print(line)
    return 0


async def _cmd_secrets(args, settings: Settings) -> int:
    return await _print_lines(secrets_cli.run(args, settings))


async def _print_lines(lines: Awaitable[list[str]]) -> int:
    """Print a subcommand's lines; its `CommandError` as `error: ...` and its exit code."""
    try:
        done = await lines
    except cliargs.CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for line in done:
        print(line)
    return 0


async def _cmd_publish(args, settings: Settings) -> int:
    from schemas import subjects
    from schemas.codec import encode

    event = cliargs.event(args)
    if event.type == "run_cancel":
        subject = subjects.event_for(event.type, event.job_id)
    else:
        subject = subjects.event(event.type, event.app)
    async with _cli_nats(settings) as nc:
        ack = await nc.jetstream().publish(
            subject, encode(event), headers={"Nats-Msg-Id": event.id}
        )
    print(json.dumps({"id": event.id, "subject": subject, "seq": ack.seq}))
    return 0


async def _cmd_watch(args, settings: Settings) -> int:
    from schemas import codec, subjects

    if args.job:
        subject = subjects.job_status(args.job)
    elif args.app:
        subject = subjects.app_status(args.app, args.session)
    else:
        subject = f"{subjects.STATUS}.>"
    from nats.js.api import DeliverPolicy

    stop = asyncio.Event()
    async with _cli_nats(settings) as nc:
        _on_signals(stop.set)
        sub = await nc.jetstream().subscribe(
            subject, ordered_consumer=True, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT
        )
        try:
            while not stop.is_set():
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except TimeoutError:
                    continue
                line = {"subject": msg.subject, **codec.loads(msg.data)}
                print(json.dumps(line), flush=True)
        finally:
            await sub.unsubscribe()  # before the drain, or it waits on the subscription
    return 0


async def _cmd_token(args, settings: Settings) -> int:
    from dispatcher.gateway.auth import mint

    secret = settings.auth.hs256_secret
    if secret is None or len(secret.get_secret_value()) < 32:
        message = "error: set SPINYARD_AUTH__HS256_SECRET (32+ characters) to mint tokens"
        print(message, file=sys.stderr)
        return 2
    ttl = cliargs.duration(args.ttl)
    if ttl > settings.auth.max_ttl_s:
        print(
            f"error: --ttl is over auth.max_ttl_s ({settings.auth.max_ttl_s:.0f} s)",
            file=sys.stderr,
        )
        return 2
    try:
        token = mint(
            secret.get_secret_value(),
            args.app,
            publish=args.publish,
            session=args.session,
            subject=args.subject,
            ttl_s=ttl,
            audience=settings.auth.audience,
            issuer=settings.auth.issuer,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinyard",
        description="Serve interactive data apps and model runs on demand, over NATS.",
    )
    parser.add_argument(
        "--log-level", help="debug, info, warning, error (default: SPINYARD_LOG_LEVEL or info)"
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "up",
        help="start the whole embedded stack with the example apps",
        description="Start nats-server, every handler, the gateway and the local "
        "backend in one process tree; register the app specs found in the given "
        "directories; print the demo URL. Ctrl-C stops everything.",
    )
    p.add_argument(
        "--apps",
        action="append",
        default=[],
        metavar="DIR",
        help="directory of app spec files to register (repeatable; default: examples)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="gateway port (default: SPINYARD_GATEWAY__PORT or 8080)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="remove apps registered by earlier runs in this data dir that are not in --apps",
    )
    p.set_defaults(run=_cmd_up)

    p = sub.add_parser(
        "handlers",
        help="run handler consumers (all, or the named kinds)",
        description="Run the named handlers against the configured NATS server, so "
        "each kind can be scaled on its own. Kinds: page_load, heartbeat, "
        "reaper_tick, pool_refill (and run_request, run_cancel, job_update when registered).",
    )
    p.add_argument("kinds", nargs="*", metavar="KIND", help="handler ids to run (default: all)")
    p.set_defaults(run=_cmd_handlers)

    p = sub.add_parser(
        "gateway",
        help="run the HTTP gateway",
        description="Serve the HTTP API, SSE status, /embed.js, the demo page and "
        "(local backend) the app reverse proxy.",
    )
    p.set_defaults(run=_cmd_gateway)

    publishing.add_apps_parser(sub).set_defaults(run=_cmd_apps)
    secrets_cli.add_secrets_parser(sub).set_defaults(run=_cmd_secrets)

    p = sub.add_parser(
        "publish",
        help="publish one event, as a page would",
        description="Build an event from options (or take --json) and publish it "
        "on JetStream. Prints the event id, subject and stream sequence.",
    )
    p.add_argument(
        "type", nargs="?", choices=["page_load", "heartbeat", "run_request", "run_cancel"]
    )
    p.add_argument("--app", metavar="OWNER/TITLE")
    p.add_argument("--session", default="cli")
    p.add_argument("--hidden", action="store_true", help="heartbeat: page not visible")
    p.add_argument("--unfocused", action="store_true", help="heartbeat: page not focused")
    p.add_argument("--idle-s", type=float, default=0.0, help="heartbeat: seconds since last input")
    p.add_argument("--inputs", help="run_request: inputs as JSON")
    p.add_argument("--job-id", help="run_cancel: the job to cancel")
    p.add_argument("--json", help="the whole event as JSON instead")
    p.set_defaults(run=_cmd_publish)

    p = sub.add_parser(
        "watch",
        help="tail status events",
        description="Print status messages as JSON lines: the current one per "
        "subject first, then each change. Everything, one app, or one job.",
    )
    p.add_argument("--app", metavar="OWNER/TITLE")
    p.add_argument("--session", help="with --app: the session of a per-session app")
    p.add_argument("--job", metavar="JOB_ID")
    p.set_defaults(run=_cmd_watch)

    p = sub.add_parser(
        "token",
        help="mint a bearer token from the configured HS256 secret",
        description="Print a JWT that lets a page use the given apps (and only the "
        "given session, if set), or with --publish lets CI publish the given owners' apps; "
        "signed with SPINYARD_AUTH__HS256_SECRET.",
    )
    p.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="OWNER/TITLE",
        help="an app the token may use (repeatable; 'owner/*' or '*' for many)",
    )
    p.add_argument(
        "--publish",
        action="append",
        default=[],
        metavar="OWNER",
        help="an owner whose apps the token may publish (repeatable; '*' for all)",
    )
    p.add_argument("--session", help="bind the token to this session id")
    p.add_argument("--subject", help="the `sub` claim: who the token is for (logged)")
    p.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 2d (default 1h)")
    p.set_defaults(run=_cmd_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "publish" and not (args.json or args.type):
        build_parser().error("publish needs an event TYPE or --json")
    if args.cmd == "token" and not (args.app or args.publish):
        build_parser().error("token needs --app or --publish (or both)")
    try:
        settings = _settings(args)
        if args.cmd in ("handlers", "up"):  # services: on uvloop when it is there
            from dispatcher.runtime import run_service

            return run_service(args.run(args, settings), settings.event_loop)
        return asyncio.run(args.run(args, settings))
    except (SettingsError, StateDirError, NatsUnavailable, NatsServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
