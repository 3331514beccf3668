"""Log lines as production writes them: JSON, stamped, redacted, nothing made below the level."""

import asyncio
import io
import json
import re
import sys
import time

import pytest

from dispatcher import logs

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class Noted:
    """A value that notes each time a log line turns it into text."""

    def __init__(self) -> None:
        self.rendered = 0

    def __repr__(self) -> str:
        self.rendered += 1
        return "<noted>"


@pytest.fixture
def json_lines(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    logs.configure("json", "info")  # writes to the stderr it finds: `err`
    yield lambda: [json.loads(line) for line in err.getvalue().splitlines()]
    monkeypatch.undo()
    logs.configure("console", "debug")  # as tests/conftest.py has it


def test_a_json_line_is_stamped_redacted_and_renders_what_json_cannot_hold(json_lines):
    before = time.time()
    value = Noted()
    log = logs.get("spinyard.test", handler="page_load").bind(token="s3cret", app="a/b")
    log.info("message_handled", outcome="ok", duration_ms=1.25, value=value)
    after = time.time()

    [line] = json_lines()
    assert line["event"] == "message_handled" and line["level"] == "info"
    assert line["handler"] == "page_load" and line["app"] == "a/b" and line["outcome"] == "ok"
    assert line["duration_ms"] == 1.25
    assert line["token"] == "***"
    assert line["value"] == "<noted>" and value.rendered == 1
    assert STAMP.match(line["timestamp"]), line["timestamp"]
    stamped = time.mktime(time.strptime(line["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
    stamped += float("0." + line["timestamp"][20:26]) - time.timezone  # the stamp is UTC
    assert before - 0.001 <= stamped <= after + 0.001


def test_lines_below_the_level_are_not_made(json_lines):
    value = Noted()
    log = logs.get("spinyard.test").bind(app="a/b")
    log.debug("keep_alive_failed", error=value)
    log.info("shown")
    assert [line["event"] for line in json_lines()] == ["shown"]
    assert value.rendered == 0


async def test_the_lines_of_one_loop_turn_go_out_together_at_its_end(json_lines):
    log = logs.get("spinyard.test")
    for i in range(3):
        log.info("handled", n=i)
    assert json_lines() == []  # not yet: this turn is still running
    await asyncio.sleep(0)  # the turn ends
    assert [line["n"] for line in json_lines()] == [0, 1, 2]
    log.warning("later")
    await asyncio.sleep(0)
    assert [line["event"] for line in json_lines()] == ["handled"] * 3 + ["later"]
