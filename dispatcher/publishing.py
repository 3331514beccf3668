"""The CLI's `apps` commands through a gateway's publish API (docs/publishing.md).

With `--gateway URL` (or `SPINYARD_GATEWAY_URL`) `spinyard apps add|rm|list|
history|rollback` call the gateway over HTTP with the publisher token in
`--token` / `SPINYARD_TOKEN`, so the gateway checks who may publish what and
keeps each app's revisions. Spec files are sent as written (YAML), so the same
file always has the same digest; a relative `workdir` is then the backend's
concern (it is not resolved against the file, as it is over NATS).
"""

import argparse
from pathlib import Path
from typing import Any

import aiohttp
import yaml


class PublishError(Exception):
    """The gateway refused a request (its error code and message), or could not be reached."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Publisher:
    """A small client of `/v1/apps/...`: one HTTP session, one token."""

    def __init__(self, url: str, token: str | None, *, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        )

    async def __aenter__(self) -> "Publisher":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.http.close()

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The answer's JSON (None for 204).

        Raises:
            PublishError: an error answer, or the gateway not reachable.
        """
        try:
            async with self.http.request(method, self.url + path, **kwargs) as resp:
                body = await resp.json() if resp.content_type == "application/json" else None
                if resp.status >= 400:
                    error = (body or {}).get("error", {})
                    code = error.get("code", resp.status)
                    raise PublishError(f"{code}: {error.get('message', resp.reason)}")
                return body
        except aiohttp.ClientError as exc:
            raise PublishError(f"cannot reach the gateway at {self.url}: {exc}", 2) from exc

    async def publish(self, name: str, text: str) -> dict:
        """PUT a spec (YAML text) as app `name`: `{app, revision, digest, changed}`."""
        headers = {"Content-Type": "application/yaml"}
        return await self.call("PUT", f"/v1/apps/{name}", data=text.encode(), headers=headers)


def _name_of(path: Path) -> tuple[str, str]:
    """The file's text and its spec's `name`."""
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as exc:
        raise PublishError(f"{path}: {exc}", 2) from exc
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise PublishError(f"{path}: an app spec needs a `name` (owner/title)", 2)
    return text, data["name"]


async def run(args: Any, url: str, token: str | None) -> list[str]:
    """One `spinyard apps ...` command against the gateway at `url`: the lines the CLI
    prints.

    Raises:
        PublishError: the gateway refused it, or could not be reached (its exit code).
    """
    lines: list[str] = []
    async with Publisher(url, token) as api:
        if args.apps_cmd == "add":
            for path in args.files:
                text, name = _name_of(Path(path))
                got = await api.publish(name, text)
                what = "published" if got["changed"] else "unchanged"
                lines.append(f"{what} {got['app']} revision {got['revision']}")
        elif args.apps_cmd == "list":
            for app in await api.call("GET", "/v1/apps"):
                mode = f"{app['sharing']:12} pool={app['pool']['size']}"
                mode = mode if app["kind"] == "viz" else ""
                lines.append(f"{app['name']:40} {app['kind']:4} {mode}".rstrip())
        elif args.apps_cmd == "rm":
            await api.call("DELETE", f"/v1/apps/{args.name}")
            lines.append(f"removed {args.name}")
        elif args.apps_cmd == "history":
            lines += history_lines(await api.call("GET", f"/v1/apps/{args.name}/revisions"))
        elif args.apps_cmd == "rollback":
            body = {"revision": args.revision}
            got = await api.call("POST", f"/v1/apps/{args.name}/rollback", json=body)
            lines.append(f"{got['app']} is at revision {got['revision']} ({got['digest']})")
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
