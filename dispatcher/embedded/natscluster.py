"""A JetStream cluster of nats-servers on loopback, for tests and benchmarks.

Each member is a `NatsServer` with a name, a store of its own, a fixed client
port and a route to every other member, so a member can be stopped and
started again where it was (same port, same store) and clients given the
whole URL list find it again. The members elect a JetStream meta leader
some time after they are up: `start` does not wait for that, which is what
a test of a fresh cluster needs.
"""

import socket
from pathlib import Path

from dispatcher.embedded.natsserver import NatsServer


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` now (held together while picked)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class NatsCluster:
    """`size` nats-servers with JetStream routed into one cluster, stores under `store_dir`."""

    def __init__(
        self,
        store_dir: Path,
        size: int = 3,
        *,
        host: str = "127.0.0.1",
        name: str = "spinyard-test",
    ):
        ports = free_ports(2 * size, host)
        clients, routes = ports[:size], ports[size:]
        route_urls = ",".join(f"nats://{host}:{p}" for p in routes)
        self.nodes = [
            NatsServer(
                Path(store_dir) / f"n{i}",
                host=host,
                port=clients[i],
                args=(
                    "--server_name",
                    f"n{i}",
                    "--cluster_name",
                    name,
                    "--cluster",
                    f"nats://{host}:{routes[i]}",
                    "--routes",
                    route_urls,
                ),
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """Every member's client URL, comma-separated (what `nats.url` takes)."""
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 10.0) -> "NatsCluster":
        """Start every member (each listening; the cluster may not have a leader yet)."""
        try:
            for node in self.nodes:
                node.start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "NatsCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
