"""Specs and constants of the Kubernetes backend's tests."""

from pathlib import Path

import yaml

from schemas.spec import AppSpec
from tests.backends.contract import echo_spec

PUBLIC_URL = "https://spinyard.example.org/"
IMAGE = "registry.test/spinyard/echo-app:1"
WAIT_S = 5.0  # every wait here is on the emulator in this process: seconds are plenty


def k8s_spec(behaviour: str = "serve", name: str = "test/echo", **fields) -> AppSpec:
    """The contract's echo spec with an image; the simulated kubelet reads its arguments."""
    return echo_spec(behaviour, name, **({"image": IMAGE} | fields))


def sim_spec(sim: str, name: str = "test/sim", **fields) -> AppSpec:
    """A spec whose simulated pod does `sim` (see `kubesim.controllers.behaviour`)."""
    env = {"SIM_BEHAVIOUR": sim} | fields.pop("env", {})
    return AppSpec(name=name, image=IMAGE, command=["serve"], env=env, **fields)


def job_spec(**fields) -> AppSpec:
    values = {"name": "test/model", "kind": "job", "image": IMAGE, "command": ["model"]}
    return AppSpec(**(values | fields))


def write_kubeconfig(
    path: Path, server_url: str, user: str, context: str = "emu", current: str | None = None
) -> Path:
    """A kubeconfig with one context for the emulator at `server_url` as `user`; `current`
    (default: that context) is its current-context."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emu", "cluster": {"server": server_url}}],
        "users": [{"name": user, "user": {"token": "t0ken"}}],
        "contexts": [{"name": context, "context": {"cluster": "emu", "user": user}}],
        "current-context": current or context,
    }
    path.write_text(yaml.safe_dump(config))
    return path
