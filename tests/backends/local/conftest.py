"""Fixtures of the local backend's tests: its settings, a data dir, and no process left behind."""

from pathlib import Path

import pytest

from dispatcher.backends.settings import LocalBackendSettings
from tests.backends.local.procs import kill_left_processes


@pytest.fixture(autouse=True)
def no_process_left(data_dir):
    """Fail a test that leaves an app, a job's model or a job runner running."""
    yield
    left = kill_left_processes(data_dir)
    assert not left, f"the test left processes running: {left}"


@pytest.fixture
def local_settings() -> LocalBackendSettings:
    return LocalBackendSettings(stop_grace_s=1.0, probe_interval_s=0.02)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"
