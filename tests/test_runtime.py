"""The handler process's event loop: uvloop when installed and chosen, asyncio's own otherwise."""

import asyncio
import sys

import pytest
import uvloop

from dispatcher.runtime import loop_factory, run_service
from dispatcher.settings import SettingsError


async def _loop_type() -> bool:
    return type(asyncio.get_running_loop()).__module__.split(".")[0] == "uvloop"


def test_auto_and_uvloop_run_on_uvloop_and_asyncio_on_asyncios_own():
    assert loop_factory("auto") is uvloop.new_event_loop
    assert run_service(_loop_type(), "auto") is True
    assert run_service(_loop_type(), "uvloop") is True
    assert loop_factory("asyncio") is None
    assert run_service(_loop_type(), "asyncio") is False


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: import fails
    assert loop_factory("auto") is None
    assert run_service(_loop_type(), "auto") is False
    with pytest.raises(SettingsError, match="uvloop is not installed"):
        loop_factory("uvloop")
