"""The files of a local job: its directory, shared by the backend, the runner and the watcher.

A job's directory, `<state_dir>/jobs/<job_id>/` (0700, files 0600):

    job.json      the runner's instructions (argv, cwd, env, limits, deadline)
    runner.json   the runner's pid, start time and boot id, the app, created_at
    inputs.json   the run's inputs, a JSON object (also the run's stdin)
    uploads.json  {"<output name>": "<PUT URL>"}, a presigned URL per declared output
    work/         the run's output directory (SPINYARD_OUTPUT_DIR)
    job.log       the run's stdout and stderr; runner.log: the runner's own
    model.json    written when the model has started (its pid)
    result.json   {state: succeeded|failed|timed_out|cancelled, exit_code,
                   log_tail, started_at, finished_at}, written once, atomically
    reported      the watcher reported the result (so a restart does not repeat it)

A job is prepared in a directory of a temporary name (`.<job_id>.<random>`)
that its runner renames into place (`jobrunner.py` says how). The lock
file `<state_dir>/jobs/<job_id>.lock` orders what may write
result.json besides the runner (a cancel, the watcher after a runner died)
and removal. Whoever changes a job tells the watcher with a datagram naming
it on `<state_dir>/jobs.sock` (`notify`).

`exit_code` is the model's, or 128 + the signal number that ended it (as a
shell or Kubernetes reports it); null if it never ran. `log_tail` is the
last 40 lines (at most 4 KiB) of job.log, where the runner also notes why it
stopped a run. Like the runner, this imports nothing of spinyard but
`processes` and `schemas.names`, so the runner starts quickly.
"""

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from dispatcher.backends.local import processes
from schemas.names import JOB_ID_RE

ENDS = ("succeeded", "failed", "timed_out", "cancelled")  # the states of a result
TAIL_LINES = 40
TAIL_BYTES = 4096


class JobDir:
    """The files of one job, shared by the backend, the runner and the watcher."""

    def __init__(self, root: Path, job_id: str, path: Path | None = None) -> None:
        self.id = job_id
        self.path = path or root / job_id  # another path while the job is being submitted
        self.lock = root / f"{job_id}.lock"
        self.inputs = self.path / "inputs.json"
        self.uploads = self.path / "uploads.json"
        self.work = self.path / "work"
        self.log = self.path / "job.log"
        self.runner_log = self.path / "runner.log"
        self.reported = self.path / "reported"

    @classmethod
    def at(cls, path: Path) -> "JobDir":
        return cls(path.parent, path.name)

    @classmethod
    def staging(cls, root: Path, job_id: str) -> "JobDir":
        """A new private directory to prepare the job in; its runner moves it into place."""
        path = Path(tempfile.mkdtemp(prefix=f".{job_id}.", dir=root))  # mode 0700
        job = cls(root, job_id, path)
        job.work.mkdir(mode=0o700)
        return job

    def read(self, name: str) -> dict | None:
        """A JSON file of the job's directory; None if it is missing or unreadable."""
        return read_json(self.path / name)

    def write(self, name: str, data: dict) -> None:
        processes.write_atomic(self.path / name, json.dumps(data).encode())

    def runner(self) -> processes.Process | None:
        return _process(self.read("runner.json"))

    def model(self) -> processes.Process | None:
        return _process(self.read("model.json"))

    def result(self) -> dict | None:
        """result.json; None if there is none yet, or it is not one (so it is written again)."""
        result = self.read("result.json") or {}
        valid = (
            result.get("state") in ENDS
            and isinstance(result.get("exit_code"), int | None)
            and isinstance(result.get("log_tail"), str | None)
        )
        return result if valid else None

    def listing(self) -> dict | None:
        """The job as `list_instances` shows it (an `Instance`'s fields); None if not started."""
        record, runner = self.read("runner.json"), self.runner()
        if record is None or runner is None:
            return None
        result = self.result()
        state = result["state"] if result else "running" if self.model() else "starting"
        return {
            "app": str(record.get("app", "")),
            "created_at": float(record.get("created_at", 0.0)),
            "alive": processes.alive(runner),
            "labels": {"pid": str(runner.pid), "state": state},
        }

    def log_tail(self) -> str:
        return processes.tail(self.log, TAIL_LINES, TAIL_BYTES)

    def note(self, text: str) -> None:
        """Add a line of spinyard's to the run's log, where users look."""
        with contextlib.suppress(OSError), processes.open_log(self.log) as log:
            log.write(f"[spinyard] {text}\n".encode())

    def finish(self, state: str, exit_code: int | None, started_at: float | None) -> dict:
        """Write result.json (the caller makes sure nobody else does) and return it."""
        result = {
            "state": state,
            "exit_code": exit_code,
            "log_tail": self.log_tail(),
            "started_at": started_at,
            "finished_at": time.time(),
        }
        self.write("result.json", result)
        return result

    async def stop(self, runner: processes.Process, state: str, note: str, grace_s: float) -> str:
        """Stop the runner and the run; record `state` if the runner left no result.

        How the runner went, as `processes.terminate` says. The caller holds the lock.
        """
        how = await processes.terminate(runner, grace_s + processes.KILL_WAIT_S)
        model = self.model()
        if model is not None and processes.signal_group(model, signal.SIGKILL):
            await processes.wait_gone(model, processes.KILL_WAIT_S)
        if self.result() is None:
            self.note(note)
            self.finish(state, None, (self.read("model.json") or {}).get("started_at"))
        return how


def job_ids(root: Path) -> list[str]:
    """The ids of the jobs with a directory under `root`, sorted."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    return [n for n in names if JOB_ID_RE.match(n)]


class Listings:
    """Jobs as `list_instances` shows them, for a reaper that lists every pass: a job that
    has ended and whose runner has exited no longer changes, so its files are read once;
    one that is gone from the directory is forgotten."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._ended: dict[str, dict] = {}

    def all(self) -> list[tuple[str, dict]]:
        """(job id, `JobDir.listing`) of every job started, in directory order."""
        ids = job_ids(self._root)
        self._ended = {j: self._ended[j] for j in ids if j in self._ended}
        found = []
        for job_id in ids:
            fields = self._ended.get(job_id) or JobDir(self._root, job_id).listing()
            if fields is None:  # being submitted, or half removed
                continue
            if not fields["alive"] and fields["labels"]["state"] not in ("starting", "running"):
                self._ended[job_id] = fields
            found.append((job_id, fields))
        return found


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _process(data: dict | None) -> processes.Process | None:
    try:
        return processes.Process(int(data["pid"]), int(data["start_time"]), str(data["boot_id"]))
    except (TypeError, KeyError, ValueError):
        return None


# Words a datagram may add to its job id (`notify`): TOLD, whoever handed the run to a
# warm runner records its start itself (the watcher then does not report it `running`);
# UNTOLD, it does not after all (the watcher forgets TOLD and looks at the job).
TOLD, UNTOLD = "told", "untold"


def notify(sock_path: str | Path, job_id: str, word: str = "") -> None:
    """Tell the watcher to look at the job (or, with a `word`, what the word says); nobody
    listening is fine (it scans at start)."""
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
        processes.unix_address(Path(sock_path)) as address,
    ):
        sock.settimeout(1.0)
        sock.sendto(f"{job_id} {word}".rstrip().encode(), address)


def fill(stage: JobDir, inputs: dict, upload_urls: dict, spec: dict) -> None:
    """Write a run's files and its runner's instructions (job.json: `spec`, as
    `staging.job_instructions` makes it) into `stage`."""
    processes.write_atomic(stage.inputs, json.dumps(inputs).encode())
    processes.write_atomic(stage.uploads, json.dumps(upload_urls).encode())
    stage.write("job.json", spec)


def remove_stale_staging(root: Path, older_than_s: float) -> None:
    """Remove what submitters that died left while preparing jobs."""
    with contextlib.suppress(FileNotFoundError), os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith(".j-") and entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - entry.stat().st_mtime > older_than_s:
                        shutil.rmtree(entry.path, ignore_errors=True)


def cpu_seconds(cores: float, deadline_s: float) -> int:
    """RLIMIT_CPU for a run: the CPU time `cores` cores give over the deadline."""
    return max(1, math.ceil(cores * deadline_s))
