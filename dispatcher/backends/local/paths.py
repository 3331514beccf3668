"""Where the local backend keeps the state of the processes it runs.

Under one root, `<state_dir>` in these modules' docstrings: `<data_dir>/local`
unless `backend.local.state_dir` names another (secrets stay under the data
dir either way: `secrets.py`):

    instances/   one state file per viz instance and warm runner (`instances.py`)
    warm/        each warm runner's directory (`warm.py`)
    jobs/        each run's directory (`jobfiles.py`), and the staging ones
    jobs.sock    the job watcher's datagram socket (`jobwatch.py`)
    logs/        viz apps' stdout and stderr

Every run and warm start creates and removes a dozen files there, so the file
system matters: on tmpfs (`/dev/shm/...`) none of it touches a disk, and a
busy ext4 spends much of a warm start allocating inodes (docs/benchmarks.md).
A `state_dir` must be ours alone: a directory owned by this user that no one
else may write to (in a shared directory such as /dev/shm, someone else could
have made it first).
"""

import contextlib
import os
import stat
from pathlib import Path


class StateDirError(RuntimeError):
    """The configured state directory is not safe to keep runs' files in."""


class LocalPaths:
    """The layout above, under `root`; `configured`: named by `state_dir`, not the data
    dir's own."""

    def __init__(self, root: Path, configured: bool = False) -> None:
        self.root, self.configured = root, configured
        self.instances, self.warm = root / "instances", root / "warm"
        self.jobs, self.socket, self.logs = root / "jobs", root / "jobs.sock", root / "logs"

    @classmethod
    def of(cls, data_dir: Path, state_dir: Path | None) -> "LocalPaths":
        if state_dir is None:
            return cls(Path(data_dir) / "local")
        return cls(Path(state_dir).absolute(), configured=True)

    def make(self) -> None:
        """Create the directories (the runs' own private to this user).

        Raises:
            StateDirError: a configured state dir is a symlink, not a directory, not
                ours, or writable by others.
        """
        if self.configured:
            with contextlib.suppress(FileExistsError):  # whatever is there is checked
                self.root.mkdir(mode=0o700, parents=True)
            self.check()
        for directory in (self.instances, self.logs, self.jobs):
            directory.mkdir(parents=True, exist_ok=True)
        self.jobs.chmod(0o700)  # inputs and upload URLs are the runs' own

    def check(self) -> None:
        """Raise StateDirError unless the root is a real directory of ours that only we write."""
        info = os.lstat(self.root)
        problem = None
        if not stat.S_ISDIR(info.st_mode):
            problem = "is not a directory (or is a symlink)"
        elif info.st_uid != os.geteuid():
            problem = f"belongs to uid {info.st_uid}, not to us ({os.geteuid()})"
        elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = f"is writable by others (mode {stat.filemode(info.st_mode)})"
        if problem:
            raise StateDirError(
                f"backend.local.state_dir {self.root} {problem}: name a directory of your own "
                "that no one else may write to (it is created 0700 if missing)"
            )
