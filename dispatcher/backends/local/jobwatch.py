"""The watcher side of the local backend's jobs: it turns what runners do into reports.

`LocalBackend.watch_jobs` runs a `JobWatcher`. Runners (`jobrunner.py`; a job's
files are `jobfiles.py`'s) send a datagram naming their job to the unix
socket `<state_dir>/jobs.sock` when the run starts and when it ends; the
watcher then reads the job's files and reports `running`, then the result.
It also watches each running job's runner with a pidfd, so a runner that
dies (and sends nothing) is noticed at once and its run reported `failed`.
"""

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from dispatcher import logs
from dispatcher.backends.local import locks, processes
from dispatcher.backends.local.jobfiles import TOLD, UNTOLD, JobDir, job_ids
from schemas.names import JOB_ID_RE

_RETRY_S, _RETRY_MAX_S = 0.5, 30.0  # backoff of a report that failed


class JobWatcher:
    """Reports each job's start and end, for `Backend.watch_jobs`.

    One watcher per data dir owns the socket: it holds `jobs.sock.lock`, and
    any other waits, trying again every `takeover_s`, until the owner stops or
    dies. The owner first looks at every job (to report what happened while
    nobody listened), then at each job a datagram names, and at each job whose
    runner exits (a pidfd per running job): no polling. A runner gone without
    a result ends its run `failed`. What was reported is remembered in memory
    while a job runs, and in its `reported` file once it has ended. A report
    that fails is tried again with backoff (the runs go on meanwhile).

    A run handed to a warm runner whose answer was RUNNING has its start recorded
    by the handler that handed it over (`Backend.submit_warm`): the backend's
    datagram `<job_id> told`, sent before the hand-over, spares that report, and
    `<job_id> untold` (sent if the answer was another, or when a start is handed
    over again) takes that back.
    """

    takeover_s = 2.0

    def __init__(
        self,
        root: Path,
        sock_path: Path,
        report: Callable[[dict], Awaitable[None]],
        grace_s: float,
    ) -> None:
        self._root, self._sock_path = root, sock_path
        self._report = report  # gets {job_id, state, exit_code, log_tail}
        self._grace_s = grace_s
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._pidfds: dict[str, int] = {}
        self._reported: set[tuple[str, str]] = set()
        self._stopping = asyncio.Event()
        self._log = logs.get("spinyard.backend.local")

    async def watch(self, stopping: asyncio.Event) -> None:
        """Own the socket (once it is free) and report until `stopping` is set."""
        owner = self._sock_path.with_name(self._sock_path.name + ".lock")
        waited = False
        while (fd := locks.lock(owner, wait=False)) is None:
            if not waited:
                self._log.info("job_watcher_waiting", socket=str(self._sock_path))
                waited = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.takeover_s)
            if stopping.is_set():
                return
        try:
            self._sock_path.unlink(missing_ok=True)  # left by a watcher that died
            with (
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
                processes.unix_address(self._sock_path) as address,
            ):
                sock.bind(address)
                os.chmod(address, 0o600)  # runners run as we do; nobody else may send
                sock.setblocking(False)
                self._log.info("job_watcher_started", socket=str(self._sock_path))
                await self._serve(sock, stopping)
        finally:
            self._sock_path.unlink(missing_ok=True)
            os.close(fd)
        self._log.info("job_watcher_stopped")

    async def _serve(self, sock: socket.socket, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = stopping
        for job_id in job_ids(self._root):  # what happened while nobody listened
            self._queue.put_nowait(job_id)
        loop.add_reader(sock.fileno(), self._receive, sock)
        stop = asyncio.create_task(stopping.wait(), name="job-watcher-stop")
        stop.add_done_callback(lambda _: self._queue.put_nowait(None))
        try:
            while (job_id := await self._queue.get()) is not None:
                await self._look_at(JobDir(self._root, job_id))
        finally:
            stop.cancel()
            loop.remove_reader(sock.fileno())
            for job_id in list(self._pidfds):
                self._unwatch(job_id)

    def _receive(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(256)
            except (BlockingIOError, InterruptedError):
                return
            job_id, _, word = data.decode(errors="replace").strip().partition(" ")
            if not JOB_ID_RE.match(job_id):
                continue
            if word == TOLD:  # its start is recorded by the handler that handed it over
                self._reported.add((job_id, "running"))
                continue
            if word == UNTOLD:
                self._reported.discard((job_id, "running"))
            self._queue.put_nowait(job_id)

    async def _look_at(self, job: JobDir) -> None:
        """Report what the job's files say, unless that was reported already."""
        runner = job.runner()
        if runner is None or job.reported.exists():
            self._unwatch(job.id)
            return
        result = job.result()
        if result is None and not processes.alive(runner):
            result = await self._runner_died(job)
        if result is None:
            self._watch(job.id, runner)
        if job.model() is not None:  # it started: say so first, even if it has ended since
            if not await self._send(job.id, {"state": "running"}):
                return
        if result is None:
            return
        self._unwatch(job.id)
        fields = {k: result.get(k) for k in ("state", "exit_code", "log_tail")}
        if not await self._send(job.id, fields):
            return
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile
            job.reported.touch(mode=0o600)
        self._reported -= {(job.id, "running"), (job.id, result.get("state"))}

    async def _runner_died(self, job: JobDir) -> dict | None:
        """The result of a job whose runner has gone: its own, or `failed` if it left none."""
        async with locks.locked(job.lock):
            runner = job.runner()
            if job.result() is not None or runner is None or processes.alive(runner):
                return job.result()
            await job.stop(runner, "failed", "the job runner died", self._grace_s)
        self._log.warning("job_runner_died", job_id=job.id, pid=runner.pid)
        return job.result()

    async def _send(self, job_id: str, fields: dict) -> bool:
        """Report once, retrying with backoff while it fails; False if stopped before it went."""
        key, delay = (job_id, fields["state"]), _RETRY_S
        while key not in self._reported:
            try:
                await self._report({"job_id": job_id, **fields})
            except Exception as exc:  # e.g. NATS is away for a while: the run goes on regardless
                self._log.warning(
                    "job_report_failed", job_id=job_id, state=key[1], error=repr(exc), retry_s=delay
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    return False
                delay = min(2 * delay, _RETRY_MAX_S)
                continue
            self._reported.add(key)
            self._log.info("job_reported", job_id=job_id, state=key[1])
        return True

    def _watch(self, job_id: str, runner: processes.Process) -> None:
        """Look at the job again when its runner exits."""
        if job_id in self._pidfds:
            return
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(runner.pid)
        except ProcessLookupError:
            self._queue.put_nowait(job_id)
            return
        except OSError:  # no pidfds (Linux < 5.3): look again now and then
            loop.call_later(self.takeover_s, self._queue.put_nowait, job_id)
            return
        if not processes.alive(runner):  # the pid was recycled before we opened it
            os.close(fd)
            self._queue.put_nowait(job_id)
            return
        self._pidfds[job_id] = fd
        loop.add_reader(fd, self._runner_exited, job_id)

    def _runner_exited(self, job_id: str) -> None:
        self._unwatch(job_id)
        processes.reap()
        self._queue.put_nowait(job_id)

    def _unwatch(self, job_id: str) -> None:
        fd = self._pidfds.pop(job_id, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
