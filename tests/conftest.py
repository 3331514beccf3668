"""Shared fixtures: a real nats-server per test (it starts in ~20 ms), settings for tests."""

import asyncio

import pytest

from dispatcher import logs
from dispatcher.natsserver import NatsServer
from dispatcher.settings import Settings

# Everything is logged; pytest shows it only for failing tests, and some tests read it.
logs.configure("console", "debug")


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def settings(tmp_path, nats_server) -> Settings:
    """Settings pointing at the test's nats-server, with timings in fractions of a second."""
    s = Settings(data_dir=tmp_path / "data", log_format="console", log_level="warning")
    s.nats.url = nats_server.url
    s.handlers.ack_wait_s = 2.0
    s.handlers.shutdown_grace_s = 2.0
    s.reaper.interval_s = 0.2
    s.reaper.reconcile_grace_s = 0.5
    s.backend.local.stop_grace_s = 1.0
    s.gateway.port = 0
    return s


async def wait_for(
    predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
):
    """Poll an (async or sync) predicate until it returns something truthy; fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
