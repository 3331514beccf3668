"""Fixtures every area shares: a real nats-server per test, a moto S3 server per module,
settings for tests, `spinyard up` stacks per module, and a check that no test leaks an
asyncio task."""

import asyncio

import pytest

from dispatcher import logs
from dispatcher.embedded.natsserver import NatsServer
from dispatcher.embedded.s3server import S3Server
from dispatcher.settings import Settings
from tests.helpers import make_settings
from tests.upstack import EXAMPLES, start_up, stop_up

# Everything is logged; pytest shows it only for failing tests, and some tests read it.
logs.configure("console", "debug")


@pytest.fixture
def nats_server(tmp_path):
    """A nats-server with JetStream on a free loopback port (it starts in ~20 ms)."""
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3_server():
    """The `host:port` of a moto S3 server that lives for the test module."""
    server = S3Server().start()
    yield server.endpoint
    server.stop()


@pytest.fixture
def settings(tmp_path, nats_server) -> Settings:
    """Settings pointing at the test's nats-server, with timings in fractions of a second."""
    return make_settings(tmp_path, nats_server.url)


@pytest.fixture(autouse=True)
async def no_task_left():
    """Fail a test that leaves asyncio tasks running in its loop (a leaked consumer, a watch)."""
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
    if left:
        # Give tasks that are finishing (cancelled, closing) one short chance to end.
        await asyncio.wait(left, timeout=1.0)
        left = [t for t in left if not t.done()]
    for task in left:
        task.cancel()
    assert not left, "the test left tasks running: " + ", ".join(t.get_name() for t in left)


@pytest.fixture(scope="module")
def launch_up(tmp_path_factory):
    """A function that starts `spinyard up` (extra `SPINYARD_*` settings as keywords) and
    returns its process, URL, token, banner and data dir; whatever still runs at the end
    of the module is killed, process group and all (tests/upstack.py)."""
    started = []

    def launch(apps=EXAMPLES, **extra_env: str) -> dict:
        stack = start_up(tmp_path_factory.mktemp("up"), extra_env, apps)
        started.append(stack)
        return stack

    yield launch
    for stack in started:
        stop_up(stack)
