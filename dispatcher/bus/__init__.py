"""Everything spinyard does on NATS: connect, provision JetStream, consume, dead-letter, permit.

- `connect`: a client with the configured credentials and endless reconnects.
- `provision`: the streams, KV buckets and durable consumers, created or updated in place.
- `consumer`: one handler's pull loop (ack, retry with backoff, dead-letter).
- `pull`: the consumer's pull requests, each message handed over as it arrives.
- `requeue`: tries counted by the consumer; an event a stop interrupted goes back unspent.
- `deadletter`: what a dead letter carries, and the watcher for events whose
  handler died on the last try.
- `permissions`: the NATS users (admin, gateway, handler) and what each may do.
- `watch`: a watch on the apps bucket (a handler process's spec memory drops changed specs).

The names below are the ones the rest of spinyard uses.
"""

from dispatcher.bus.connect import NatsUnavailable, connect
from dispatcher.bus.provision import ensure, ensure_state

__all__ = ["NatsUnavailable", "connect", "ensure", "ensure_state"]
