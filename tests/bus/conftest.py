"""Fixtures of a three-node JetStream cluster on loopback, and settings for it (R3)."""

import pytest

from dispatcher import bus
from dispatcher.embedded.natscluster import NatsCluster
from dispatcher.settings import Settings
from handlers import catalog  # noqa: F401 - registers the built-in handlers
from handlers.registry import default_registry
from tests.helpers import make_settings


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory):
    """Three nats-servers routed into one JetStream cluster, for the test module."""
    cluster = NatsCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
async def r3_settings(tmp_path, nats_cluster) -> Settings:
    """Settings for the module's cluster (every member's URL, three replicas of everything),
    its JetStream provisioned afresh for the test: what an earlier test left is deleted first.
    """
    s = make_settings(tmp_path, nats_cluster.url)
    s.nats.replicas = 3
    nc = await bus.connect(s.nats, "test-setup")
    try:
        js = nc.jetstream()
        await bus.ensure(js, s.nats, [], s.handlers)  # waits for a cluster still electing
        for info in await js.streams_info():
            await js.delete_stream(info.config.name)
        await bus.ensure(js, s.nats, default_registry.select(None), s.handlers)
    finally:
        await nc.close()
    return s
