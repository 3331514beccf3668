"""The nats-server supervisor: a dead server comes back on its port and store, within bounds."""

import asyncio
import os
import signal

import nats
import pytest

from dispatcher.embedded.natsserver import NatsServer, NatsServerError
from dispatcher.embedded.supervisor import RestartBudget, supervise
from tests.helpers import wait_for


def test_the_budget_counts_restarts_in_a_sliding_window():
    budget = RestartBudget(restarts=2, window_s=10)
    assert budget.take(0) and budget.take(1)
    assert not budget.take(5)  # a third within 10 s
    assert budget.take(10.5)  # the first has left the window
    assert budget.used == 2
    assert not RestartBudget(restarts=0, window_s=10).take(0)


async def test_a_killed_server_is_restarted_with_its_port_and_store(tmp_path):
    server = NatsServer(tmp_path / "nats").start()
    task = asyncio.create_task(supervise(server, restarts=3, window_s=60), name="supervisor")
    try:
        nc = await nats.connect(server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
        js = nc.jetstream()
        await js.add_stream(name="kept", subjects=["kept.>"])
        await js.publish("kept.one", b"1")
        first, port = server.proc.pid, server.port
        os.kill(first, signal.SIGKILL)
        await wait_for(lambda: server.proc.pid != first, what="a new nats-server process")
        assert server.port == port and not task.done()
        # The client reconnects by itself, and the stream (on disk) is still there.
        ack = await asyncio.wait_for(js.publish("kept.two", b"2"), 10)
        assert ack.stream == "kept" and ack.seq == 2
        await nc.close()
    finally:
        task.cancel()
        await asyncio.wait([task])
        server.stop()


async def test_it_gives_up_after_too_many_restarts(tmp_path):
    server = NatsServer(tmp_path / "nats").start()
    task = asyncio.create_task(supervise(server, restarts=1, window_s=60), name="supervisor")
    try:
        first = server.proc.pid
        os.kill(first, signal.SIGKILL)
        await wait_for(lambda: server.proc.pid != first, what="the one restart")
        os.kill(server.proc.pid, signal.SIGKILL)
        with pytest.raises(NatsServerError, match="restarts within the last 60 s: 1 of 1 allowed"):
            await asyncio.wait_for(task, 10)
        assert server.proc.poll() is not None  # left dead: `up` stops
    finally:
        task.cancel()
        await asyncio.wait([task])
        server.stop()


async def test_a_restart_waits_out_its_delay(tmp_path):
    server = NatsServer(tmp_path / "nats").start()
    task = asyncio.create_task(
        supervise(server, restarts=3, window_s=60, delay_s=1.0), name="supervisor"
    )
    try:
        first = server.proc.pid
        os.kill(first, signal.SIGKILL)
        killed = asyncio.get_running_loop().time()
        await wait_for(lambda: server.proc.pid != first, what="a new nats-server process")
        assert asyncio.get_running_loop().time() - killed >= 1.0
    finally:
        task.cancel()
        await asyncio.wait([task])
        server.stop()
