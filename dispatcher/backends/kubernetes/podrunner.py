"""The warm runner of a Kubernetes pod: it waits on a port for its one run, runs it, and exits.

A job app's warm runner is a bare pod of the app's image (no credentials, no
service account token; `objects.make_warm_pod`) whose container runs this
file's source with `python -c`, so an image needs nothing of spinyard, only
a `python` (3.8 or newer). It imports only the standard library, and nothing of
spinyard, for that reason. (The local backend's warm runner,
`local/warmrunner.py`, is built on that backend's job files, unix sockets
and watcher, and forks Python models with their preloads; this one travels
in the pod's command as one file and execs the model: what a warm pod saves
is the pod's start, not the interpreter's.) Its settings come from the
environment:

    SPINYARD_RUNNER_HOST   the address to listen on: the pod's IP (downward API)
    SPINYARD_RUNNER_PORT   the port (the backend's `warm_runner_port`)
    SPINYARD_RUNNER_TOKEN  the launch's bearer token, the pod's own (its pod spec holds it)

It answers `GET /healthz` 200 while it waits (the pod's readiness probe) and
takes one `POST /launch` (JSON: job_id, inputs, upload_urls, argv, env, cwd):
it writes inputs.json and uploads.json into a new directory under /tmp (the
pod's emptyDir), sets SPINYARD_INPUTS, SPINYARD_UPLOADS and SPINYARD_OUTPUT_DIR
to them, starts the model with `argv` in a session of its own (its stdin the
inputs, its stdout and stderr the container's log) and answers 200; from
then on its readiness probe fails. A launch again with the same job id (an answer lost on the way)
is answered 200 again and starts nothing; another job id gets 409, a wrong
token 403, a body that is not a launch 400. The model's environment is the
container's without the SPINYARD_RUNNER_* variables, then the launch's `env`.
When the model exits, so does the runner, with its exit code (128 + the signal
that ended it), and the pod ends: one run per pod. The deadline is the pod's
activeDeadlineSeconds, set when the backend hands over the run; a SIGTERM
(the pod deleted: a cancel) is passed to the model's group.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

PREFIX = "SPINYARD_RUNNER_"
MAX_LAUNCH_BYTES = 8 * 2**20  # inputs are size-limited well below this by run_request
_FIELDS = ("job_id", "inputs", "upload_urls", "argv", "env")


class Runner:
    """One run's hand-over: what was launched, and the model once started."""

    def __init__(self, token: str, base_env: dict) -> None:
        self.token = token
        self.base_env = base_env
        self.job_id = None
        self.model = None
        self.lock = threading.Lock()
        self.started = threading.Event()
        self.wake = threading.Event()  # a run started, or a SIGTERM came

    def launch(self, body: dict) -> tuple:
        """Start the run `body` describes, once: (HTTP status, answer)."""
        with self.lock:
            if self.job_id is not None:
                if body.get("job_id") == self.job_id:
                    return 200, {"job_id": self.job_id, "state": "started"}
                return 409, {"error": "this runner has a run already"}
            try:
                self.model = self._start(body)
            except OSError as exc:
                sys.stderr.write(f"podrunner: could not start the run: {exc}\n")
                return 500, {"error": f"could not start {body['argv'][0]!r}: {exc.strerror}"}
            self.job_id = body["job_id"]
            self.started.set()
            self.wake.set()
            return 200, {"job_id": self.job_id, "state": "started"}

    def _start(self, body: dict) -> subprocess.Popen:
        run_dir = tempfile.mkdtemp(prefix="spinyard-run-")
        outputs = os.path.join(run_dir, "outputs")
        os.mkdir(outputs)
        paths = {
            "SPINYARD_INPUTS": os.path.join(run_dir, "inputs.json"),
            "SPINYARD_UPLOADS": os.path.join(run_dir, "uploads.json"),
            "SPINYARD_OUTPUT_DIR": outputs,
        }
        for key, name in (("inputs", "SPINYARD_INPUTS"), ("upload_urls", "SPINYARD_UPLOADS")):
            fd = os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(body[key], f, sort_keys=True)
        env = {**self.base_env, **body["env"], **paths}
        with open(paths["SPINYARD_INPUTS"], "rb") as stdin:
            return subprocess.Popen(
                body["argv"],
                cwd=body.get("cwd") or outputs,
                env=env,
                stdin=stdin,
                start_new_session=True,
            )


def valid(body: object) -> bool:
    """Whether `body` is a launch: the fields, of their types."""
    return (
        isinstance(body, dict)
        and all(k in body for k in _FIELDS)
        and isinstance(body["job_id"], str)
        and isinstance(body["inputs"], dict)
        and isinstance(body["upload_urls"], dict)
        and isinstance(body["argv"], list)
        and bool(body["argv"])
        and all(isinstance(a, str) for a in body["argv"])
        and isinstance(body["env"], dict)
        and all(isinstance(v, str) for v in body["env"].values())
        and isinstance(body.get("cwd") or "", str)
    )


def handler_for(runner: Runner) -> type:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/healthz":
                self._answer(404, {"error": "not found"})
            elif runner.started.is_set():
                self._answer(503, {"state": "running"})
            else:
                self._answer(200, {"state": "waiting"})

        def do_POST(self) -> None:
            if self.path != "/launch":
                self._answer(404, {"error": "not found"})
                return
            if self.headers.get("Authorization") != f"Bearer {runner.token}":
                self._answer(403, {"error": "not this runner's launch token"})
                return
            size = int(self.headers.get("Content-Length") or 0)
            if not 0 < size <= MAX_LAUNCH_BYTES:
                self._answer(400, {"error": "a launch needs a JSON body"})
                return
            try:
                body = json.loads(self.rfile.read(size))
            except ValueError:
                body = None
            if not valid(body):
                self._answer(400, {"error": f"a launch is a JSON object of {', '.join(_FIELDS)}"})
                return
            self._answer(*runner.launch(body))

        def _answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the container's log is the run's: no access lines in it

    return Handler


def main() -> int:
    host = os.environ.get(PREFIX + "HOST") or "0.0.0.0"
    port = int(os.environ[PREFIX + "PORT"])
    token = os.environ.get(PREFIX + "TOKEN") or ""
    if not token:
        sys.stderr.write("podrunner: SPINYARD_RUNNER_TOKEN is not set\n")
        return 2
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    runner = Runner(token, base_env)

    def on_term(signum: int, frame: object) -> None:
        runner.wake.set()
        if runner.model is not None:
            try:
                os.killpg(runner.model.pid, signal.SIGTERM)
            except OSError:
                pass

    signal.signal(signal.SIGTERM, on_term)
    server = HTTPServer((host, port), handler_for(runner))
    # Idle while it waits: no wake-ups but a request's (a node holds many of these).
    serve = threading.Thread(target=server.serve_forever, args=(3600,), daemon=True)
    serve.start()
    runner.wake.wait()  # a signal's handler runs meanwhile, and sets it
    if not runner.started.is_set():
        return 0  # stopped before a run came
    status = runner.model.wait()
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main())
