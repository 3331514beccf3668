"""NATS users and what each may publish and subscribe to: defined once, here.

Three roles share one NATS account (`$G`):

- `gateway` faces browsers. It may publish the browser-facing event kinds
  with a JetStream ack, read app, deployment, run and revision records, and
  read status (direct get, and ordered consumers it deletes when the browser
  goes). It writes only app specs and their revisions (publishing over
  HTTP, behind a publisher token: docs/publishing.md). It can create no
  stream or bucket, write no other KV and no status, and publish no event
  kind that only handlers emit (a reaper tick, a job update).
- `handler` is every handler process: it creates or updates the streams,
  buckets and durable consumers it needs at start (`dispatcher.bus.ensure`),
  pulls from its durable consumer on SPINYARD_EVENTS, reads and writes the
  KV buckets, and publishes status, events and dead letters. It cannot
  delete a stream or consumer, nor publish outside the spinyard subjects.
- `admin` may do anything: `spinyard up` and CLI administration.

Two renderings use the same lists, so they cannot drift:
`server_config(passwords)` gives the `authorization {}` block that
`spinyard up`'s embedded nats-server loads, and
`python -m dispatcher.bus.permissions --k8s > k8s/base/nats/auth.conf` writes the
Kubernetes copy, where each password is an environment variable reference
(`$NATS_PASSWORD_GATEWAY`) that the NATS StatefulSet fills from a Secret.
tests/bus/test_permissions.py checks the committed file is current and exercises
every role against a real nats-server.
"""

import argparse
import sys

from schemas import subjects

ADMIN = "admin"
GATEWAY = "gateway"
HANDLER = "handler"
ROLES = (ADMIN, GATEWAY, HANDLER)

# Event kinds a browser may cause, through the gateway. Ticks, pool refills
# and job updates come only from handlers.
BROWSER_KINDS = (subjects.PAGE_LOAD, subjects.HEARTBEAT, subjects.RUN_REQUEST, subjects.RUN_CANCEL)

# Where JetStream replies to API calls, acks and KV reads: the client's inbox.
INBOX = "_INBOX.>"

API = "$JS.API"

_MESSAGE_STREAMS = (subjects.EVENTS_STREAM, subjects.STATUS_STREAM, subjects.DEAD_STREAM)


def _kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def _both(prefix: str) -> list[str]:
    """`prefix` itself and anything below it (`>` needs at least one more token)."""
    return [prefix, f"{prefix}.>"]


def _read_stream(stream: str) -> list[str]:
    """Read a stream: info, get one message (direct or not), and ordered consumers on it.

    Ordered consumers (KV `keys()`/`watch()`, status streams) are ephemeral,
    created by `CONSUMER.CREATE.<stream>`, asked for their pending count by
    `CONSUMER.INFO`, and answer the server's flow control on `$JS.FC.<stream>.>`.
    """
    return [
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.STREAM.MSG.GET.{stream}",
        *_both(f"{API}.DIRECT.GET.{stream}"),
        *_both(f"{API}.CONSUMER.CREATE.{stream}"),
        f"{API}.CONSUMER.INFO.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]


def _manage_stream(stream: str) -> list[str]:
    """Create or update a stream (never delete or purge it)."""
    return [f"{API}.STREAM.CREATE.{stream}", f"{API}.STREAM.UPDATE.{stream}"]


def _gateway() -> dict[str, list[str]]:
    publish = [f"{subjects.EVENTS}.{kind}.>" for kind in BROWSER_KINDS]
    publish.append(f"{API}.STREAM.NAMES")
    publish += _read_stream(subjects.STATUS_STREAM)
    # An SSE stream deletes its ordered consumer when the browser goes.
    publish.append(f"{API}.CONSUMER.DELETE.{subjects.STATUS_STREAM}.*")
    for bucket in subjects.GATEWAY_BUCKETS:
        publish += _read_stream(_kv_stream(bucket))
    publish += [f"$KV.{bucket}.>" for bucket in subjects.PUBLISH_BUCKETS]
    return {"publish": publish, "subscribe": [INBOX, f"{subjects.STATUS}.>"]}


def _handler() -> dict[str, list[str]]:
    events = subjects.EVENTS_STREAM
    publish = [
        f"{subjects.EVENTS}.>",
        f"{subjects.STATUS}.>",
        f"{subjects.DEAD}.>",
        *(f"$KV.{bucket}.>" for bucket in subjects.BUCKETS),
        f"{API}.INFO",
        f"{API}.STREAM.NAMES",
    ]
    for stream in (*_MESSAGE_STREAMS, *(_kv_stream(b) for b in subjects.BUCKETS)):
        publish += _manage_stream(stream)
        publish += _read_stream(stream)
    publish += [
        # Durable pull consumers, one per handler id, on the events stream.
        f"{API}.CONSUMER.DURABLE.CREATE.{events}.*",
        f"{API}.CONSUMER.MSG.NEXT.{events}.*",
        # ack, nak (with delay), term and in-progress of events.
        f"$JS.ACK.{events}.>",
        # An event whose handler died on its last try is dead-lettered, then removed.
        f"{API}.STREAM.MSG.DELETE.{events}",
    ]
    exhausted = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{events}.*"
    return {"publish": publish, "subscribe": [INBOX, exhausted]}


def _admin() -> dict[str, list[str]]:
    return {"publish": [">"], "subscribe": [">"]}


_ROLES = {ADMIN: _admin, GATEWAY: _gateway, HANDLER: _handler}


def permissions(role: str) -> dict[str, dict[str, list[str]]]:
    """What `role` may publish and subscribe to, in nats-server's shape.

    Args:
        role: one of `ROLES`.

    Returns:
        `{"publish": {"allow": [...]}, "subscribe": {"allow": [...]}}`; a
        subject not allowed is denied.

    Raises:
        ValueError: `role` is not one of `ROLES`.
    """
    try:
        lists = _ROLES[role]()
    except KeyError:
        raise ValueError(f"unknown NATS role {role!r}; known: {', '.join(ROLES)}") from None
    return {direction: {"allow": allow} for direction, allow in lists.items()}


def _quote(value: str) -> str:
    return f'"{value}"'


def _render(password_tokens: dict[str, str], header: str) -> str:
    lines = [header, "authorization {", "  users = ["]
    for role in ROLES:
        lines += [
            "    {",
            f"      user: {_quote(role)}",
            f"      password: {password_tokens[role]}",
        ]
        lines.append("      permissions: {")
        for direction, rules in permissions(role).items():
            lines.append(f"        {direction}: {{")
            lines.append("          allow: [")
            lines += [f"            {_quote(s)}," for s in rules["allow"]]
            lines += ["          ]", "        }"]
        lines += ["      }", "    },"]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def _check_password(role: str, password: str) -> None:
    if not password:
        raise ValueError(f"empty NATS password for {role!r}")
    if any(c in password for c in '"\\') or any(ord(c) < 32 or ord(c) == 127 for c in password):
        raise ValueError(f"NATS password for {role!r} has a quote, backslash or control character")


def server_config(passwords: dict[str, str]) -> str:
    """The nats-server `authorization {}` block: one user per role, with its permissions.

    The block holds only users, passwords and publish/subscribe allow lists;
    listen addresses, `jetstream {}` and monitoring are the caller's.

    Args:
        passwords: a plain-text password for every role in `ROLES`, e.g. from
            `secrets.token_urlsafe()`; no quotes, backslashes or control characters.

    Returns:
        Config text for nats-server, to write into or `include` from its config file.

    Raises:
        ValueError: a role is missing or unknown, or a password cannot be written safely.
    """
    missing = set(ROLES) - set(passwords)
    unknown = set(passwords) - set(ROLES)
    if missing or unknown:
        raise ValueError(
            f"passwords must name exactly {', '.join(ROLES)}; "
            f"missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    for role, password in passwords.items():
        _check_password(role, password)
    return _render(
        {role: _quote(passwords[role]) for role in ROLES},
        "# spinyard NATS users, from dispatcher/bus/permissions.py.",
    )


def password_env(role: str) -> str:
    """Environment variable the Kubernetes NATS pods read `role`'s password from."""
    return f"NATS_PASSWORD_{role.upper()}"


def k8s_config() -> str:
    """The `authorization {}` block for k8s/base/nats/auth.conf: passwords come from env vars."""
    return _render(
        {role: f"${password_env(role)}" for role in ROLES},
        "# Generated by `python -m dispatcher.bus.permissions --k8s`\n"
        "# from dispatcher/bus/permissions.py; do not edit.\n"
        "# Passwords are read from the environment of the NATS pods.",
    )


def main(argv: list[str] | None = None) -> int:
    """Write the Kubernetes auth.conf to stdout."""
    prog = "python -m dispatcher.bus.permissions"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument(
        "--k8s",
        action="store_true",
        required=True,
        help="render k8s/base/nats/auth.conf (passwords from env vars)",
    )
    parser.parse_args(argv)
    sys.stdout.write(k8s_config())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
