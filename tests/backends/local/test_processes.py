"""Process-tree helpers of the local backend, in a child process of their own (a subreaper
adopts orphans: the test process must not become one)."""

import subprocess
import sys
import textwrap

from dispatcher.backends.local.jobrunner import CODE_ROOT

SCRIPT = textwrap.dedent(
    """
    import os, time
    from dispatcher.backends.local import processes

    assert not processes.childless_subreaper(), "not a subreaper yet"
    assert processes.become_subreaper()
    assert processes.childless_subreaper(), "a subreaper with no child"
    child = os.fork()
    if child == 0:  # leaves a grandchild in a session of its own, then exits
        if os.fork() == 0:
            os.setsid()
            time.sleep(1.0)
            os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)
    assert not processes.childless_subreaper(), "the orphan is ours now"
    assert len(processes.descendants(os.getpid())) == 1
    os.waitpid(-1, 0)  # the orphan exits
    assert processes.childless_subreaper(), "nothing is left below us"
    assert processes.descendants(os.getpid()) == []
    print("checked")
    """
)


def test_a_subreaper_is_childless_only_once_its_orphans_are_gone_too():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=CODE_ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "checked"
