"""A run's instructions and files, prepared for its runner: the same for a cold and a warm start.

`job_instructions` says what job.json holds. For a cold start,
`LocalBackend.submit_job` writes the job's files in a staging directory
(`stage`) and starts a runner on it (`start_runner`); for a warm start,
`LocalBackend.submit_warm` sends the instructions to a waiting runner
(`warm.py`), which writes the same files itself. Either runner claims the
directory by renaming it into place (`jobrunner.py`).
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dispatcher.backends.launch import argv, job_env, job_values
from dispatcher.backends.local import processes
from dispatcher.backends.local.jobfiles import JobDir, cpu_seconds, fill
from dispatcher.backends.local.jobrunner import CLAIMED, CODE_ROOT, EXISTS
from handlers.errors import StartFailed
from handlers.ports import JobLaunch
from schemas import errors as codes
from schemas.spec import AppSpec


def job_instructions(
    job: JobDir,
    launch: JobLaunch,
    spec: AppSpec,
    *,
    python: str,
    stop_grace_s: float,
    socket: Path,
    secrets: dict[str, str],
    nice: int = 0,
) -> dict:
    """What the job's runner is to do, as job.json holds it; no file is written.

    The app, argv, cwd (the spec's workdir, else the job's output dir), the run's
    environment (ours without spinyard's settings, then `launch.job_env`, naming
    `job`'s paths), deadline (counted from now), grace, limits, log cap, the job's
    directory, the watcher's socket and the niceness the run runs at (ours plus `nice`,
    at most 19: a warm runner, which waits at ours, lowers itself and its model to it).
    `secrets` (the values of the secrets the spec
    names) go in the environment, so in job.json: a 0600 file in the 0700 jobs
    directory.

    Raises:
        handlers.errors.StartFailed: the spec's resources are not quantities.
    """
    try:
        memory = processes.memory_bytes(spec.resources.memory)
        cores = processes.quantity(spec.resources.cpu)
    except ValueError as exc:
        raise StartFailed(f"the app's resources: {exc}", code=codes.START_FAILED) from exc
    values = job_values(python=python)
    paths = {"inputs": str(job.inputs), "uploads": str(job.uploads), "output_dir": str(job.work)}
    env = job_env(spec, job.id, values, **paths, deadline_s=launch.deadline_s, secrets=secrets)
    return {
        "app": spec.name,
        "argv": argv(spec, values),
        "cwd": spec.workdir or str(job.work),
        "env": processes.child_env(env),
        "job_dir": str(job.path),
        "created_at": time.time(),
        "deadline_s": launch.deadline_s,
        "stop_grace_s": stop_grace_s,
        "memory_bytes": memory,
        "cpu_seconds": cpu_seconds(cores, launch.deadline_s),
        "max_log_bytes": spec.max_log_bytes,
        "socket": str(socket),
        "nice": min(os.getpriority(os.PRIO_PROCESS, 0) + nice, 19),
    }


def stage(job: JobDir, launch: JobLaunch, spec: dict) -> JobDir:
    """The job's files and its runner's instructions `spec` (`job_instructions`) in a new
    staging directory beside `job`'s, for a runner to claim."""
    staged = JobDir.staging(job.path.parent, job.id)  # filled here, moved into place by a runner
    try:
        fill(staged, launch.inputs, launch.upload_urls, spec)
    except BaseException:
        shutil.rmtree(staged.path, ignore_errors=True)
        raise
    return staged


async def start_runner(staging: JobDir, nice: int = 0) -> bool:
    """Start a runner for the job prepared in `staging` (`nice`: see `processes.spawn`):
    True if it took the job on.

    The runner claims the job by renaming `staging` to the job's directory, with
    its runner.json in it; if the job's directory exists, it removes `staging`
    and exits (False). No lock is held meanwhile, so a submitter that hangs
    keeps nobody waiting, and one that dies after this started leaves a run.

    Raises:
        processes.SpawnError: the runner could not be started, or exited at once.
    """
    import asyncio  # not at import: the runner itself never needs it

    argv = [sys.executable, "-m", "dispatcher.backends.local.jobrunner", str(staging.path)]
    env = processes.child_env({})
    try:
        popen, runner = processes.spawn(
            argv, env, CODE_ROOT, staging.runner_log, stdout=subprocess.PIPE, nice=nice
        )
    except processes.SpawnError:
        shutil.rmtree(staging.path, ignore_errors=True)
        raise
    reading = asyncio.ensure_future(asyncio.to_thread(popen.stdout.readline))
    reading.add_done_callback(lambda _: popen.stdout.close())  # also if we are cancelled
    answer = await asyncio.shield(reading)
    if answer == CLAIMED:
        return True
    if answer == EXISTS:
        await processes.wait_gone(runner, processes.KILL_WAIT_S)  # it is exiting: leave nothing
        return False
    tail = processes.tail(staging.runner_log, 10)
    shutil.rmtree(staging.path, ignore_errors=True)
    raise processes.SpawnError("the job runner exited at start" + (f": {tail}" if tail else ""))
