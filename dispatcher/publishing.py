"""The CLI's `apps` commands through a gateway's publish API (docs/publishing.md).

With `--gateway URL` (or `SPINYARD_GATEWAY_URL`) `spinyard apps add|rm|list|
history|rollback` call the gateway over HTTP, through the Python client
(`spinyard.client`), with the publisher token in `SPINYARD_TOKEN`, so the
gateway checks who may publish what and keeps each app's revisions. Spec
files are sent as written (YAML), so the same file always has the same
digest; a relative `workdir` is then the backend's concern (it is not
resolved against the file, as it is over NATS).
"""

import argparse
from pathlib import Path
from typing import Any

from dispatcher.cliargs import CommandError
from spinyard import ApiError, AsyncClient, SpecError, Unreachable


class PublishError(CommandError):
    """The gateway refused a request (its error code and message), or could not be reached."""


async def run(args: Any, url: str, token: str | None) -> list[str]:
    """One `spinyard apps ...` command against the gateway at `url`: the lines the CLI
    prints. The HTTP is `spinyard.client`'s (docs/client.md).

    Raises:
        PublishError: the gateway refused it (exit 1), or could not be reached, or a spec
            file could not be read (exit 2).
    """
    try:
        async with AsyncClient(url, token) as api:
            return await _apps(api, args)
    except ApiError as exc:
        raise PublishError(f"{exc.code}: {exc.message}") from exc
    except (Unreachable, SpecError) as exc:
        raise PublishError(exc.message, 2) from exc


def app_line(name: str, kind: str, sharing: str, pool: int, windows: int) -> str:
    """One line of `spinyard apps list` (through a gateway or over NATS alike)."""
    mode = f"{sharing:12} pool={pool}" if kind == "viz" else ""
    mode += f" +schedule({windows})" if windows else ""
    return f"{name:40} {kind:4} {mode}".rstrip()


async def _apps(api: AsyncClient, args: Any) -> list[str]:
    lines: list[str] = []
    if args.apps_cmd == "add":
        for path in args.files:
            got = await api.publish(Path(path))  # sent as written: the same file, the same digest
            what = "published" if got.changed else "unchanged"
            lines.append(f"{what} {got.app} revision {got.revision}")
    elif args.apps_cmd == "list":
        for app in await api.apps():
            windows = len(app.pool.schedule or [])
            lines.append(app_line(app.name, app.kind, app.sharing, app.pool.size, windows))
    elif args.apps_cmd == "rm":
        await api.remove(args.name)
        lines.append(f"removed {args.name}")
    elif args.apps_cmd == "history":
        lines += history_lines((await api.revisions(args.name)).model_dump(mode="json"))
    elif args.apps_cmd == "rollback":
        got = await api.rollback(args.name, args.revision)
        lines.append(f"{got.app} is at revision {got.revision} ({got.digest})")
    return lines


def history_lines(history: dict) -> list[str]:
    """Revisions as lines: `* 3  2026-12-02T03:40:00Z  ci  sha256:...` (`*`: current)."""
    import datetime as dt

    lines = []
    for r in history["revisions"]:
        mark = "*" if r["revision"] == history["current"] else " "
        when = dt.datetime.fromtimestamp(r["published_at"], dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        by = r["published_by"] or "-"
        lines.append(f"{mark} {r['revision']:<4} {when}  {by:20} {r['digest']}")
    return lines


def add_apps_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """`spinyard apps ...`: its actions and options (the CLI's `_cmd_apps` runs them)."""
    p = sub.add_parser(
        "apps",
        help="publish, list, remove or roll back apps",
        description="Manage the registered apps: through a gateway's publish API with "
        "--gateway (or SPINYARD_GATEWAY_URL) and a publisher token in SPINYARD_TOKEN, "
        "else in the apps KV bucket over NATS with admin credentials.",
    )
    p.add_argument("--gateway", metavar="URL", help="the gateway to publish through")
    apps = p.add_subparsers(dest="apps_cmd", required=True, metavar="ACTION")
    a = apps.add_parser("add", help="register (or update) apps from spec files")
    a.add_argument("files", nargs="+", metavar="SPEC.yaml")
    apps.add_parser("list", help="list registered apps")
    a = apps.add_parser("rm", help="remove an app (its deployments are reaped on the next pass)")
    a.add_argument("name", metavar="OWNER/TITLE")
    a = apps.add_parser("history", help="an app's published revisions (* marks the current)")
    a.add_argument("name", metavar="OWNER/TITLE")
    a = apps.add_parser("rollback", help="make an earlier revision current again (gateway only)")
    a.add_argument("name", metavar="OWNER/TITLE")
    a.add_argument("revision", type=int, metavar="REVISION")
    return p
