"""Importing this module registers every built-in handler in the default registry."""

from handlers import (  # noqa: F401
    heartbeat,
    job_update,
    page_load,
    pool_refill,
    reaper_tick,
    run_cancel,
    run_request,
    run_start,
)
