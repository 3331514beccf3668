"""A tiny model for job tests: it shows what spinyard handed it, then does as told.

Only the standard library. It prints one line `job_model: <JSON>` with what it
got: the inputs read from stdin and from the SPINYARD_INPUTS file, the upload
URLs from SPINYARD_UPLOADS, every SPINYARD_* variable and JOB_* variable,
its cwd, the modes of its files, its /proc/self/cmdline (a model forked from a
warm runner has the runner's), and which of the modules named in
JOB_SEE_MODULES (comma-separated) were imported before it ran. Then, in this order:

    --allocate MB    allocate (and touch) MB mebibytes; prints "job_model: allocated"
    --upload         PUT each output to its URL: the body is `<name> of <job id>`
    --write          write `hello` to $SPINYARD_OUTPUT_DIR/scratch.txt
    --children N     start N child processes that sleep (a process tree)
    --escape N       start N processes that leave its group with setsid(), ignore SIGTERM
                     and sleep; their pids go to $SPINYARD_OUTPUT_DIR/escaped (one a line)
    --flood MB       write MB mebibytes of numbered lines to stdout
    --ignore-term    ignore SIGTERM (so only SIGKILL stops it)
    --spin S         use S seconds of CPU time
    --sleep S        print "job_model: sleeping" and sleep S seconds
    --exit CODE      print "job_model: failing with CODE" to stderr and exit CODE
"""

import argparse
import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request

# A process that tries to outlive its run: its own session, deaf to SIGTERM.
ESCAPEE = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


def mode(path: str) -> str:
    return oct(stat.S_IMODE(os.stat(path).st_mode))


def main() -> int:
    wanted = [m for m in os.environ.get("JOB_SEE_MODULES", "").split(",") if m]
    preloaded = [m for m in wanted if m in sys.modules]
    parser = argparse.ArgumentParser()
    parser.add_argument("--allocate", type=int, default=0)
    parser.add_argument("--upload", action="store_true")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--children", type=int, default=0)
    parser.add_argument("--escape", type=int, default=0)
    parser.add_argument("--flood", type=int, default=0)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--spin", type=float, default=0)
    parser.add_argument("--sleep", type=float, default=0)
    parser.add_argument("--exit", type=int, default=0)
    args = parser.parse_args()

    stdin = sys.stdin.read()
    with open(os.environ["SPINYARD_INPUTS"]) as f:
        from_file = json.load(f)
    with open(os.environ["SPINYARD_UPLOADS"]) as f:
        uploads = json.load(f)
    env = {k: v for k, v in os.environ.items() if k.startswith(("SPINYARD_", "JOB_"))}
    seen = {
        "stdin": json.loads(stdin) if stdin else None,
        "inputs": from_file,
        "uploads": uploads,
        "env": env,
        "cwd": os.getcwd(),
        "argv": sys.argv[1:],
        "preloaded": preloaded,
        "cmdline": open("/proc/self/cmdline", "rb").read().decode().split("\0")[:-1],
        "modes": {
            "inputs": mode(os.environ["SPINYARD_INPUTS"]),
            "uploads": mode(os.environ["SPINYARD_UPLOADS"]),
            "output_dir": mode(os.environ["SPINYARD_OUTPUT_DIR"]),
            "job_dir": mode(os.path.dirname(os.environ["SPINYARD_INPUTS"])),
        },
    }
    print("job_model: " + json.dumps(seen), flush=True)

    if args.allocate:
        block = bytearray(args.allocate * 1024 * 1024)
        block[::4096] = b"x" * len(block[::4096])
        print("job_model: allocated", flush=True)
    if args.upload:
        for name, url in uploads.items():
            body = f"{name} of {os.environ['SPINYARD_JOB_ID']}".encode()
            headers = {"Content-Type": "text/plain"}  # urllib's default is a form
            request = urllib.request.Request(url, data=body, method="PUT", headers=headers)
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status < 300, response.status
        print("job_model: uploaded", flush=True)
    if args.write:
        with open(os.path.join(os.environ["SPINYARD_OUTPUT_DIR"], "scratch.txt"), "w") as f:
            f.write("hello")
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    children = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        for _ in range(args.children)
    ]
    escaped = [
        subprocess.Popen(
            [sys.executable, "-c", ESCAPEE], start_new_session=True, stdout=subprocess.DEVNULL
        )
        for _ in range(args.escape)
    ]
    if escaped:
        with open(os.path.join(os.environ["SPINYARD_OUTPUT_DIR"], "escaped"), "w") as f:
            f.write("".join(f"{p.pid}\n" for p in escaped))
    line = 0
    for _ in range(args.flood * 1024 * 1024 // 64):
        line += 1
        sys.stdout.write(f"job_model: flood line {line:>12} ".ljust(63, ".") + "\n")
    sys.stdout.flush()
    while time.process_time() < args.spin:
        pass
    if args.sleep:
        print("job_model: sleeping", flush=True)
        time.sleep(args.sleep)
    for child in children:
        child.kill()
        child.wait()
    if args.exit:
        print(f"job_model: failing with {args.exit}", file=sys.stderr, flush=True)
    return args.exit


if __name__ == "__main__":
    sys.exit(main())
