"""A test model for runs: behaviour chosen by its inputs.

inputs: {"mode": "ok"|"fail"|"sleep"|"wait_for"|"greedy",
         "outputs": {"name": "text"}, "marker_dir": path, "wait_for": path, "seconds": n,
         "see_modules": [module names]}
It appends its job id to <marker_dir>/runs (so tests can count runs), writes
which of `see_modules` were imported before it ran to <marker_dir>/modules-<job id>
(a JSON list: a warm runner's preloads), uploads
each output with a PUT to its presigned URL, then acts by mode.
"""

import json
import os
import pathlib
import sys
import time
import urllib.request


def main() -> int:
    inputs = json.load(sys.stdin)
    job = os.environ["SPINYARD_JOB_ID"]
    if inputs.get("marker_dir") and "see_modules" in inputs:
        found = [m for m in inputs["see_modules"] if m in sys.modules]
        (pathlib.Path(inputs["marker_dir"]) / f"modules-{job}").write_text(json.dumps(found))
    if inputs.get("marker_dir"):
        with open(pathlib.Path(inputs["marker_dir"]) / "runs", "a") as f:
            f.write(job + "\n")
    with open(os.environ["SPINYARD_UPLOADS"]) as f:
        urls = json.load(f)
    for name, text in inputs.get("outputs", {}).items():
        # urllib's default body type is a form, which some S3 servers parse away.
        headers = {"Content-Type": "application/octet-stream"}
        req = urllib.request.Request(urls[name], data=text.encode(), method="PUT", headers=headers)
        urllib.request.urlopen(req, timeout=10).close()
    mode = inputs.get("mode", "ok")
    if mode == "fail":
        print("about to fail: the answer was not 42", file=sys.stderr)
        return 3
    if mode == "sleep":
        time.sleep(float(inputs.get("seconds", 60)))
    if mode == "wait_for":
        path = pathlib.Path(inputs["wait_for"])
        while not path.exists():
            time.sleep(0.05)
    print(f"done {job}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
