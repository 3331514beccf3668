"""Values from `spinyard` command-line arguments (the event `publish` sends, a duration), and
the error a subcommand ends with.

Bad input ends the command with its message (SystemExit), as argparse's own errors do.
"""

import argparse
import json

from pydantic import BaseModel, ValidationError

from schemas.codec import decode_event


class CommandError(Exception):
    """A subcommand cannot be done: `error: <message>` on stderr and `exit_code` (2: bad input
    or nothing to talk to; 1: refused or not found)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def event(args: argparse.Namespace) -> BaseModel:
    """The event `spinyard publish` was given: its `--json`, or built from its flags."""
    if args.json:
        body = args.json
    else:
        obj: dict = {"type": args.type, "app": args.app, "session": args.session}
        if args.type == "heartbeat":
            obj |= {
                "visible": not args.hidden,
                "focused": not args.unfocused,
                "idle_s": args.idle_s,
            }
        if args.type == "run_request":
            obj["inputs"] = json.loads(args.inputs or "{}")
        if args.type == "run_cancel":
            obj = {"type": "run_cancel", "job_id": args.job_id}
        body = json.dumps({k: v for k, v in obj.items() if v is not None})
    try:
        return decode_event(body.encode(), "application/json")
    except (ValueError, ValidationError) as exc:
        raise SystemExit(f"error: not a valid event: {exc}") from None


def duration(text: str) -> float:
    """'90', '90s', '15m', '1h', '2d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise SystemExit(f"error: not a duration: {text!r} (use e.g. 90s, 15m, 1h)") from None
