"""spinyard's runtime: everything between the outside world and the handlers.

- `compose`: the composition root; `cli`: the `spinyard` command; `settings`, `logs`,
  `metrics`, `waits`: what every part uses.
- `bus/`: NATS (connect, provision, the consumer loop, dead letters, permissions).
- `runtime`: the handler service; `gateway/`: the HTTP gateway; `store`: object storage.
- `backends/`: where apps and runs execute (`local/`, `kubernetes/`, and their shared
  launch contract); `embedded/`: `spinyard up` and the servers it starts.
"""
