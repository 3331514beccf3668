"""spinyard's handlers: what happens to each event, between the bus and the backends.

One module per event kind (`page_load`, `heartbeat`, `pool_refill`,
`reaper_tick`, `run_request`, `run_cancel`, `job_update`), each registering
its function with `@handler` (`registry`); `catalog` imports them all. The
records they keep in JetStream KV live beside their operations
(`deployments`, `pools`, `activity`, `jobs`), over the typed compare-and-set
access in `state`; `reconcile` checks records against what the backend runs.
Handlers reach the outside world only through `ctx` (`context`) and the
abstract `Backend` and `ObjectStore` (`ports`); `errors` says what becomes of
a message that failed, and what of it a browser may read.

This package imports only `schemas`; `dispatcher` implements the ports and
runs the handlers.
"""
