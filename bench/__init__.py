"""spinyard's benchmarks: `python -m bench [viz|runs|all] [--quick] [--json PATH]`.

Each bench starts its own servers (nats-server, handler processes, peers) on
free loopback ports, measures against a baseline taken in the same run, and
stops everything it started. Speed is only ever measured here, never
asserted in unit tests; tests/test_bench.py only checks the harness works.
See docs/benchmarks.md for what each figure means and the latest numbers.
"""
