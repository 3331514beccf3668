"""spinyard's Python client: the gateway's HTTP API for platforms' backends and CI.

`AsyncClient` (asyncio) and `Client` (blocking, for scripts) publish app
specs, load apps and wait for `ready`, submit runs and wait for their
results, cancel them, and follow status over Server-Sent Events, with the
models of `schemas` as their types. See docs/client.md.

    from spinyard import Client

    with Client("https://spinyard.example.org", token) as spinyard:
        job_id = spinyard.run("alice/model", {"days": 90})
        print(spinyard.result(job_id).results)
"""

from spinyard.client import AsyncClient, new_session
from spinyard.errors import (
    ApiError,
    LoadFailed,
    RunFailed,
    SpecError,
    SpinyardError,
    Unreachable,
    WaitTimeout,
)
from spinyard.sync import Client

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "LoadFailed",
    "RunFailed",
    "SpecError",
    "SpinyardError",
    "Unreachable",
    "WaitTimeout",
    "new_session",
]
