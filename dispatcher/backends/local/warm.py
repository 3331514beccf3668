"""The backend's side of warm runners: start one for an app's pool, hand it a run, stop it.

A warm runner (`warmrunner.py` says what it does) is an instance of kind
`warm` in the instance state files (`instances.py`), so the reaper lists,
claims and stops it as it does a viz pool member; its own files are under
`<state_dir>/warm/<instance>/` (0700). `LocalBackend.submit_warm`
hands the runner the run over its socket (`hand`): what a cold start would
write in the job's directory, which the runner writes itself (so the
handler's event loop does no file work on the start's path); from then on
the run is an ordinary job and the runner is no pool member any more (its
state file and directory go).

A new runner is forked from a waiting one when one may be (`_fork`): same
app, revision, command, workdir, preloads, memory and environment (a digest
of it: warm.json holds no values), and its first interpreter started less
than `backend.local.warm_fork_max_age_s` ago, so a pool that refills after
every run pays a fork, not an interpreter's start and its imports, while
code on disk that changed under an unchanged spec is picked up within that
age. Otherwise it is started as ever (`_spawn`).
"""

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from dispatcher.backends.launch import argv, check_id, fill, job_values
from dispatcher.backends.local import processes
from dispatcher.backends.local.forkedmodel import forks
from dispatcher.backends.local.instances import InstanceFiles, InstanceState
from dispatcher.backends.local.jobfiles import read_json
from dispatcher.backends.local.jobrunner import CLAIMED, CODE_ROOT, EXISTS, RUNNING
from dispatcher.backends.local.warmrunner import FORK, FORKED, READY, SOCKET, run_message
from handlers.errors import StartFailed
from handlers.ports import JobLaunch
from schemas import errors as codes
from schemas.spec import AppSpec

_CONNECT_S = 1.0  # to connect to a waiting runner's socket (loopback: well under 1 ms)
_ANSWER_S = 5.0  # for its answer: it writes the job's files, renames them in, forks the model
_TAIL_LINES = 10


class WarmRunners:
    """Warm runners under one data dir."""

    def __init__(
        self,
        root: Path,
        jobs: Path,
        instances: InstanceFiles,
        python: str,
        log: FilteringBoundLogger,
        fork_max_age_s: float = 0.0,
    ) -> None:
        """A runner is forked from a waiting one whose interpreter is younger than
        `fork_max_age_s` (0: never). Runners wait at our niceness: the hand-over is on a
        start's way; once it has answered, a runner lowers itself and its model to the
        run's (`backend.local.run_nice`, named in job.json)."""
        self.root, self._jobs, self._instances = root, jobs, instances
        self._python, self._log = python, log
        self._fork_max_age_s = fork_max_age_s
        self._last_seed: dict[str, str] = {}  # app -> the runner last forked from

    def dir(self, instance_id: str) -> Path:
        return self.root / instance_id

    def waiting(self, state: InstanceState) -> bool:
        """Whether the runner is alive and still waits for its run (its socket is there)."""
        return processes.alive(state.process) and (self.dir(state.id) / SOCKET).exists()

    async def start(
        self,
        instance_id: str,
        spec: AppSpec,
        timeout: float,  # noqa: ASYNC109
        secrets: dict[str, str],
    ) -> None:
        """Start a warm runner for `spec` unless it runs; return once it waits for a run.

        Its environment has the spec's secrets (`secrets`, their values), as a run's
        has, so a model may read them while it is imported.

        Raises:
            ValueError: `instance_id` is not an instance id.
            handlers.errors.StartFailed: the resources are not quantities, the runner
                exited (a preload failed to import, say; its log's tail is given), or
                it did not wait for a run within `timeout`.
        """
        check_id(instance_id)
        processes.reap()
        try:
            memory = processes.memory_bytes(spec.resources.memory)
        except ValueError as exc:
            raise StartFailed(f"the app's resources: {exc}", code=codes.START_FAILED) from exc
        directory = self.dir(instance_id)
        async with self._instances.locked(instance_id):
            old = self._instances.load(instance_id)
            if old is not None and processes.alive(old.process):
                return
            if old is not None:
                processes.signal_group(old.process, signal.SIGKILL)
            config, env = self._config(directory, spec, memory, secrets)
            popen, seed = None, self._seed(instance_id, config)
            proc = await self._fork(seed, directory, config) if seed else None
            if proc is None:
                popen, proc = self._spawn(directory, config, env)
            state = InstanceState(
                id=instance_id, app=spec.name, kind="warm", pid=proc.pid, port=0, host="",
                start_time=proc.start_time, boot_id=proc.boot_id, pooled=True,
                created_at=time.time(),
            )  # fmt: skip
            self._instances.write(state)
        if popen is None:
            assert seed is not None
            self._log.info("warm_runner_started", forked_from=seed[0].id, **state.fields())
            return
        reading = asyncio.ensure_future(asyncio.to_thread(popen.stdout.readline))
        reading.add_done_callback(lambda _: popen.stdout.close())
        try:
            answer = await asyncio.wait_for(asyncio.shield(reading), timeout)
        except TimeoutError:
            answer = None
        if answer == READY:
            self._log.info("warm_runner_started", **state.fields())
            return
        tail = processes.tail(directory / "warm.log", _TAIL_LINES)
        async with self._instances.locked(instance_id) as lock_path:
            await processes.terminate(proc, 0)
            self._forget(instance_id, lock_path)
        if answer is None:
            message = f"the warm runner was not ready within {max(1, round(timeout))} s"
            raise StartFailed(message, code=codes.START_TIMEOUT, log_tail=tail)
        raise StartFailed("the warm runner exited at start", code=codes.START_FAILED, log_tail=tail)

    def _config(
        self, directory: Path, spec: AppSpec, memory: int, secrets: dict[str, str]
    ) -> tuple[dict, dict[str, str]]:
        """What the runner's warm.json says (less `born`), and its environment."""
        values = job_values(python=self._python)
        fork = forks(spec.command)
        env = processes.child_env({k: fill(v, values) for k, v in spec.env.items()} | secrets)
        config = {
            "app": spec.name,
            "argv": argv(spec, values),
            "cwd": spec.workdir or str(directory),
            "preload": spec.preload if fork else [],
            "fork": fork,
            "memory_bytes": memory,
            "jobs": str(self._jobs),
            # what else decides whether a runner may be forked from another (`_seed`)
            "interpreter": self._python if fork else sys.executable,
            "revision": spec.revision,
            "env_sha256": hashlib.sha256(json.dumps(sorted(env.items())).encode()).hexdigest(),
        }
        return config, env

    def _seed(self, instance_id: str, config: dict) -> tuple[InstanceState, float] | None:
        """A waiting pool runner started for the same `config` as `instance_id` (the cwd
        aside: a spec without a workdir runs in the runner's directory) and young enough to
        fork from, with its interpreter's start time; None if there is none. The runner
        last forked from for the app is tried before the others' state files are read."""
        if self._fork_max_age_s <= 0:
            return None
        oldest = time.time() - self._fork_max_age_s
        ours = _comparable(config, self.dir(instance_id))
        for state in self._seed_candidates(config["app"]):
            if state is None or state.kind != "warm" or not state.pooled:
                continue
            if state.app != config["app"] or state.id == instance_id:
                continue
            theirs = read_json(self.dir(state.id) / "warm.json") or {}
            born = theirs.get("born", 0.0)
            if born > oldest and _comparable(theirs, self.dir(state.id)) == ours:
                if self.waiting(state):
                    self._last_seed[config["app"]] = state.id
                    return state, born
        return None

    def _seed_candidates(self, app: str) -> Iterator[InstanceState | None]:
        """The app's last seed, then every instance (read only if the first will not do)."""
        if app in self._last_seed:
            yield self._instances.load(self._last_seed[app])
        yield from self._instances.all()

    async def _fork(
        self, seed: tuple[InstanceState, float], directory: Path, config: dict
    ) -> processes.Process | None:
        """Ask the waiting runner `seed` for a sibling in `directory` (`warmrunner.py`): the
        sibling once it waits for a run, or None if it could not be had (then nothing of
        it is left running)."""
        state, born = seed
        self._fresh(directory, config | {"born": born})
        proc = None
        try:
            with processes.unix_address(self.dir(state.id) / SOCKET) as address:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(address), _CONNECT_S
                )
            try:
                writer.write(FORK + os.fsencode(directory) + b"\n")
                word, _, pid = (await asyncio.wait_for(reader.readline(), _ANSWER_S)).partition(
                    b" "
                )
                if word == READY.strip() and pid.strip().isdigit():
                    proc = processes.current(int(pid))
                    writer.write(FORKED)  # it goes on only once it has this
                    await writer.drain()
                    return proc
            finally:
                writer.close()  # a sibling that has no word from us then ends
        except (OSError, TimeoutError) as exc:
            if proc is not None:
                processes.signal_group(proc, signal.SIGKILL)
            why = type(exc).__name__
        else:
            why = "no sibling"  # it went, or was handed its run, before it answered
        self._log.warning("warm_runner_fork_failed", app=config["app"], seed=state.id, why=why)
        return None

    def _fresh(self, directory: Path, config: dict) -> None:
        """A new, empty `directory` for a runner, with its warm.json."""
        shutil.rmtree(directory, ignore_errors=True)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700)
        processes.write_atomic(directory / "warm.json", json.dumps(config).encode())

    def _spawn(
        self, directory: Path, config: dict, env: dict[str, str]
    ) -> tuple[subprocess.Popen, processes.Process]:
        """Start a runner with an interpreter of its own."""
        self._fresh(directory, config | {"born": time.time()})
        command = [config["interpreter"], "-m", "dispatcher.backends.local.warmrunner"]
        try:
            return processes.spawn(
                [*command, str(directory)], env, CODE_ROOT, directory / "warm.log",
                stdout=subprocess.PIPE,
            )  # fmt: skip
        except processes.SpawnError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise StartFailed(str(exc), code=codes.START_FAILED) from exc

    async def claim(self, state: InstanceState) -> bool:
        """Mark a waiting runner as taken (not a pool member); False if it no longer waits."""
        if not self.waiting(state):
            return False
        if state.pooled:
            self._instances.write(state.model_copy(update={"pooled": False}))
        return True

    async def hand(self, instance_id: str, launch: JobLaunch, spec: dict) -> bytes | None:
        """Hand the run to the runner: its inputs, upload URLs and instructions (`spec`,
        job.json's); the runner writes the job's files and starts it. Its answer
        (`RUNNING` once the model's process is there, `CLAIMED` if it took the run but
        the model did not start, `EXISTS`), or None if it could not take it (gone, dead,
        or it did not answer; then it is stopped). Either way the runner is no longer a
        warm runner."""
        check_id(instance_id)
        message = run_message(launch.inputs, launch.upload_urls, spec)
        async with self._instances.locked(instance_id) as lock_path:
            state = self._instances.load(instance_id)
            answer = None
            if state is not None and state.kind == "warm" and processes.alive(state.process):
                with contextlib.suppress(OSError, TimeoutError):
                    answer = await self._send(instance_id, message)
                if answer not in (RUNNING, CLAIMED, EXISTS):
                    answer = None
                    await processes.terminate(state.process, 0)
            if answer is None:
                self._forget(instance_id, lock_path)
            else:  # it removes its own directory once it has answered, off the start's path
                self._instances.remove(instance_id)
                lock_path.unlink(missing_ok=True)
        return answer

    async def _send(self, instance_id: str, message: bytes) -> bytes:
        with processes.unix_address(self.dir(instance_id) / SOCKET) as address:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(address), _CONNECT_S
            )
        try:
            writer.write(message)
            return await asyncio.wait_for(reader.readline(), _ANSWER_S)
        finally:
            writer.close()

    def _forget(self, instance_id: str, lock_path: Path) -> None:
        """Remove a runner's state file, directory and lock file (the caller holds the lock)."""
        self._instances.remove(instance_id)
        self.remove_dir(instance_id)
        lock_path.unlink(missing_ok=True)  # under the lock: waiters notice and retry

    def remove_dir(self, instance_id: str) -> None:
        shutil.rmtree(self.dir(instance_id), ignore_errors=True)

    def sweep(self, older_than_s: float) -> None:
        """Remove the directories of runners that are no instances any more and were not
        touched for `older_than_s` (a runner handed its run removes its own; one that
        died before it did leaves it)."""
        with contextlib.suppress(FileNotFoundError), os.scandir(self.root) as entries:
            for entry in entries:
                if self._instances.path(entry.name).exists():
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - entry.stat().st_mtime > older_than_s:
                        shutil.rmtree(entry.path, ignore_errors=True)


def _comparable(config: dict, directory: Path) -> dict:
    """A runner's warm.json as `_seed` compares it: without its `born`, and its cwd as "."
    when that is its own directory."""
    cwd = config.get("cwd")
    return config | {"born": None, "cwd": "." if cwd == str(directory) else cwd}
