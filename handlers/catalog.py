"""Importing this module registers every built-in handler in the default registry."""

from handlers import heartbeat, page_load, pool, reaper  # noqa: F401
