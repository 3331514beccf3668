"""What the local backend's tests read of processes from /proc, without trusting the backend."""

import os
import signal
from pathlib import Path

PUBLIC_URL = "http://gateway.test:8080/"


def running_copies(instance_id: str, variable: str = "SPINYARD_INSTANCE") -> int:
    """Live processes whose environment names the instance or job (children inherit it)."""
    needle = f"{variable}={instance_id}".encode()
    count = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:  # gone meanwhile, or another user's
            continue
        state = stat[stat.rindex(b")") + 2 :].split()[0]
        if state not in (b"Z", b"X") and needle in environ.split(b"\0"):
            count += 1
    return count


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def session_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 2 :].split()[3])


def niceness(pid: int) -> tuple[int, int | None]:
    """`pid`'s niceness, and its session's where the kernel schedules sessions as groups
    (autogroup; None on a kernel without it)."""
    try:
        line = Path(f"/proc/{pid}/autogroup").read_text()  # "/autogroup-7 nice 10"
    except FileNotFoundError:
        return os.getpriority(os.PRIO_PROCESS, pid), None
    return os.getpriority(os.PRIO_PROCESS, pid), int(line.split()[-1])


def niced_as_runs(added: int = 10) -> tuple[int, int | None]:
    """What `niceness` says of a run's process at run_nice's default (10 above ours), or
    of a process in a session of its own `added` above ours (0: a waiting warm runner)."""
    niced = min(os.getpriority(os.PRIO_PROCESS, 0) + added, 19)
    return niced, niced if Path("/proc/self/autogroup").exists() else None


def start_time(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def processes_logging_to(directory: Path, fd: int = 1) -> list[int]:
    """Live processes whose stdout (or `fd`) is a file under `directory`: apps started
    there, and theirs."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stdout = os.readlink(f"/proc/{name}/fd/{fd}")
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        state = stat[stat.rindex(b")") + 2 :].split()[0]
        if stdout.startswith(f"{directory}/") and state not in (b"Z", b"X"):
            found.append(int(name))
    return found


def kill_left_processes(data_dir: Path) -> list[int]:
    """Kill what still runs of apps, jobs' models and job runners started under `data_dir`
    (all of them write their output there), so none outlives the test; their pids."""
    left = processes_logging_to(data_dir)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left
