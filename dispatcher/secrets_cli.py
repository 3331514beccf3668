"""`spinyard secrets set|list|rm APP [NAME]`: an app's secrets, from a terminal or from CI.

With `--gateway URL` (or `SPINYARD_GATEWAY_URL`) the commands call the
gateway's secrets routes (`dispatcher.gateway.secrets`) through the Python
client (`spinyard.client`) with the publisher token in `SPINYARD_TOKEN`;
without, they write the configured backend's store directly
(`dispatcher.compose.secret_store`): the local backend's data dir, or the
apps namespace's Secrets through the operator's kubeconfig. Never over NATS.

`set` reads the value from `--from-env VAR`, else from standard input (all
of it, one trailing newline dropped), else, on a terminal, from a prompt that
does not echo: never from an argument, which shell history and `ps` would keep.
cli.py prints what `run` returns; nothing here prints.
"""

import argparse
import getpass
import os
import sys
from typing import Any

from dispatcher.cliargs import CommandError
from dispatcher.settings import Settings
from handlers.errors import PermanentError, RetryableError
from schemas.names import check_app, check_secret_name
from spinyard import ApiError, AsyncClient, Unreachable


class SecretsError(CommandError):
    """The command cannot be done: bad input (exit 2), refused or not found (1)."""


def read_value(args: Any) -> str:
    """The value to set, from `--from-env`, standard input or a prompt (see the module).

    Raises:
        SecretsError: the variable is not set, or the value is empty.
    """
    if args.from_env:
        # The one variable the user named, read on purpose: not a setting.
        value = os.environ.get(args.from_env)
        if value is None:
            raise SecretsError(f"--from-env: {args.from_env} is not set", 2)
    elif sys.stdin.isatty():
        value = getpass.getpass(f"value of {args.name} (not shown): ")
    else:
        value = sys.stdin.read()
        value = value[:-2] if value.endswith("\r\n") else value.removesuffix("\n")
    if not value:
        raise SecretsError("the value is empty (to remove a secret: spinyard secrets rm)", 2)
    return value


async def run(args: Any, settings: Settings) -> list[str]:
    """One `spinyard secrets ...` command: the lines the CLI prints.

    Raises:
        SecretsError: bad input or an unreachable gateway (exit 2); refused, or the secret
            to remove is not set (exit 1).
    """
    try:
        app = check_app(args.app)
        name = check_secret_name(args.name) if args.secrets_cmd != "list" else None
    except ValueError as exc:
        raise SecretsError(str(exc), 2) from exc
    value = read_value(args) if args.secrets_cmd == "set" else None
    url = args.gateway or settings.gateway_url
    if url:
        token = settings.token.get_secret_value() if settings.token else None
        return await _through_gateway(args.secrets_cmd, app, name, value, url, token)
    return await _in_store(args.secrets_cmd, app, name, value, settings)


async def _through_gateway(
    cmd: str, app: str, name: str | None, value: str | None, url: str, token: str | None
) -> list[str]:
    try:
        async with AsyncClient(url, token) as api:
            if cmd == "list":
                return await api.secrets(app)
            if cmd == "set":
                return [_set_line(app, name, (await api.set_secret(app, name, value)).created)]
            await api.remove_secret(app, name)
            return [f"removed {app} {name}"]
    except ApiError as exc:
        raise SecretsError(f"{exc.code}: {exc.message}") from exc
    except Unreachable as exc:
        raise SecretsError(exc.message, 2) from exc


async def _in_store(
    cmd: str, app: str, name: str | None, value: str | None, settings: Settings
) -> list[str]:
    from dispatcher.compose import secret_store

    try:
        async with secret_store(settings) as store:
            if cmd == "list":
                return await store.names(app)
            if cmd == "set":
                return [_set_line(app, name, await store.put(app, name, value))]
            if not await store.remove(app, name):
                raise SecretsError(f"{app} has no secret {name}")
            return [f"removed {app} {name}"]
    except (PermanentError, RetryableError) as exc:  # the Kubernetes API refused, or is away
        raise SecretsError(f"{exc.code}: {exc}") from exc


def _set_line(app: str, name: str, created: bool) -> str:
    return f"set {app} {name} ({'new' if created else 'replaced'})"


def add_secrets_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """`spinyard secrets ...`: its actions and options (the CLI's `_cmd_secrets` runs them)."""
    p = sub.add_parser(
        "secrets",
        help="set, list or remove an app's secrets",
        description="An app's secrets reach the environment of its instances and runs whose "
        "spec names them (`secrets: [NAME]`). Through a gateway with --gateway (or "
        "SPINYARD_GATEWAY_URL) and a publisher token in SPINYARD_TOKEN, else straight into "
        "the configured backend's store. Values are read from --from-env, standard input "
        "or a prompt; never from the command line. Listing shows names only.",
    )
    p.add_argument("--gateway", metavar="URL", help="the gateway to go through")
    actions = p.add_subparsers(dest="secrets_cmd", required=True, metavar="ACTION")
    a = actions.add_parser("set", help="set a secret (value from stdin, a prompt or --from-env)")
    a.add_argument("app", metavar="OWNER/TITLE")
    a.add_argument("name", metavar="NAME")
    a.add_argument("--from-env", metavar="VAR", help="take the value from this variable")
    a = actions.add_parser("list", help="the names of the app's secrets")
    a.add_argument("app", metavar="OWNER/TITLE")
    a = actions.add_parser("rm", help="remove a secret")
    a.add_argument("app", metavar="OWNER/TITLE")
    a.add_argument("name", metavar="NAME")
    return p
