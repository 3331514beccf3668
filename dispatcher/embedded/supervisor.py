"""Keep `spinyard up`'s nats-server running: restart it where it was if it dies.

The handlers and the gateway reconnect to the same URL for ever, so a
server started again on the same port and store is all they need: its
streams, buckets and durable consumers are on disk, and the consumer loops
pull again once their connection is back (measured: everything answered
again within a second of a SIGKILL). A server that keeps dying is not
restarted for ever: after `restarts` restarts within `window_s` seconds the
supervisor gives up, and `spinyard up` stops with an error.
"""

import asyncio
import collections

from dispatcher import logs
from dispatcher.embedded.natsserver import NatsServer, NatsServerError

log = logs.get("spinyard.up")

RETRY_START_S = 0.5  # pause after a restart that failed, before the next try


class RestartBudget:
    """At most `restarts` restarts in any `window_s` seconds."""

    def __init__(self, restarts: int, window_s: float):
        self.restarts = restarts
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque()

    def take(self, now: float) -> bool:
        """Count one restart at `now`; False if that is one too many for the window."""
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        if len(self._times) >= self.restarts:
            return False
        self._times.append(now)
        return True

    @property
    def used(self) -> int:
        return len(self._times)


async def supervise(
    server: NatsServer, restarts: int, window_s: float, delay_s: float = 0.0
) -> None:
    """Restart `server` (same port, same store) each time it exits, `delay_s` seconds
    later, until cancelled.

    Cancel it before stopping the server on purpose, or that stop counts as a death.

    Raises:
        NatsServerError: it died more than `restarts` times within `window_s` seconds,
            or could not be started again within that budget.
    """
    loop = asyncio.get_running_loop()
    budget = RestartBudget(restarts, window_s)
    logfile = server.store_dir / "nats-server.log"
    while True:
        assert server.proc is not None
        # A thread waits on the process: no polling, and it ends when the process does
        # (also when `up` stops the server after cancelling us).
        code = await asyncio.to_thread(server.proc.wait)
        await asyncio.sleep(delay_s)
        while True:
            if not budget.take(loop.time()):
                raise NatsServerError(
                    f"nats-server exited again (code {code}); restarts within the last "
                    f"{window_s:g} s: {budget.used} of {restarts} allowed "
                    f"(SPINYARD_EMBEDDED__NATS_RESTARTS); giving up. See {logfile}"
                )
            try:
                # In this (the main) thread: the server's parent-death signal follows the
                # thread that started it. The start takes tens of milliseconds.
                server.start()
            except NatsServerError as exc:
                log.error("nats_server_restart_failed", error=str(exc), port=server.port)
                await asyncio.sleep(RETRY_START_S)
                continue
            break
        log.warning(
            "nats_server_restarted",
            exit_code=code,
            port=server.port,
            restarts=budget.used,
            window_s=window_s,
        )
