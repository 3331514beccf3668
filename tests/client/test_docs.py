"""docs/client.md's examples, run as written (each Python block a script, the YAML block the
file it names) against `spinyard up`, in the order the page gives them, so the page cannot
rot: a renamed call, a changed answer or a wrong comment fails here."""

import os
import re
import subprocess
import sys

from tests.helpers import ROOT

DOC = ROOT / "docs" / "client.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)

# What each Python block (by its section) must print, in order of the page.
EXPECTED = [
    ("## Publish from CI", [r"^published alice/epidemic revision 1$"]),
    (
        "## Run a model and wait for its results",
        [
            r"^succeeded in \d+\.\d s$",
            r"^summary\.json application/json \d+ bytes$",
            r"^trajectory\.csv text/csv \d+ bytes$",
        ],
    ),
    (
        "## Load an app, follow a run (async)",
        [
            r"^demo/hello is ready at http://127\.0\.0\.1:\d+/apps/demo/hello/i-\w+/",
            r"^j-\w+ succeeded $",
        ],
    ),
    ("## Cancel", [r"^j-\w+ (cancelled|succeeded)$"]),
    (
        "## Revisions and rollback",
        [
            r"^  1 ci-alice sha256:\w+$",
            r"^\* 2 ci-alice sha256:\w+$",
            r"^alice/epidemic is at revision 3, with the first one's spec$",
        ],
    ),
    (
        "## Errors",
        [
            r"^422 invalid_spec kind: Input should be 'viz' or 'job'",
            r"^job_failed 2 .*inputs out of range",
            r"^start_failed the app exited with code 3 before it was ready",
        ],
    ),
]


def blocks() -> list[tuple[str, str, str]]:
    """(section, language, code) of every fenced block of the page."""
    text = DOC.read_text()
    found = []
    for match in BLOCK.finditer(text):
        heading = re.findall(r"^## .*$", text[: match.start()], re.M)
        found.append((heading[-1] if heading else "", match.group(1), match.group(2)))
    return found


def test_the_page_has_the_examples_this_test_expects():
    python = [section for section, lang, _ in blocks() if lang == "python"]
    assert python == [section for section, _ in EXPECTED]


def test_the_examples_run_as_written(stack, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINYARD_")}
    env |= {
        "PYTHONPATH": str(ROOT),
        "SPINYARD_GATEWAY_URL": stack["url"],
        "SPINYARD_TOKEN": stack["token"],
    }
    expected = iter(EXPECTED)
    for section, lang, code in blocks():
        if lang == "yaml" and code.startswith("# "):  # a file the examples read
            (tmp_path / code.splitlines()[0][2:].strip()).write_text(code)
            continue
        if lang != "python":
            continue
        want_section, patterns = next(expected)
        assert section == want_section
        script = tmp_path / "example.py"
        script.write_text(code)
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        where = f"{section}:\n{done.stdout}\n{done.stderr}"
        assert done.returncode == 0 and done.stderr == "", where
        lines = done.stdout.splitlines()
        for pattern in patterns:
            assert any(re.search(pattern, line) for line in lines), f"no {pattern!r} in {where}"
