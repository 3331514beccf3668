"""The client ships: the distribution's packages include it, the image's build context lets it
in (the CLI's `apps --gateway` imports it), and it imports nothing of spinyard but `schemas`."""

import subprocess
import sys
import tomllib

from setuptools import find_packages

from tests.helpers import ROOT


def test_the_distribution_and_the_image_carry_the_client():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(ROOT, include=include)
    assert "spinyard" in packages
    allowed = (ROOT / ".dockerignore").read_text().splitlines()
    for top in {p.split(".")[0] for p in packages}:
        assert f"!{top}/" in allowed, f"{top}/ is left out of the image's build context"


def test_importing_the_client_loads_no_part_of_the_dispatcher():
    code = (
        "import sys, spinyard; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'dispatcher', 'handlers'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
