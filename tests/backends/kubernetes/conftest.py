"""Fixtures of the Kubernetes tests: the API emulator, simulated controllers, backends on them."""

import pytest

import kubesim
from dispatcher.backends.kubernetes.backend import KubernetesBackend
from dispatcher.backends.settings import KubernetesBackendSettings
from tests.backends.kubernetes.support import PUBLIC_URL
from tests.helpers import ROOT


@pytest.fixture
async def server():
    async with kubesim.apiserver() as found:
        yield found


@pytest.fixture
async def cluster(server):
    async with kubesim.Cluster(server) as found:
        yield found


@pytest.fixture
def k8s_settings() -> KubernetesBackendSettings:
    return KubernetesBackendSettings(
        pod_templates_dir=ROOT / "k8s/base/pod-templates",
        api_timeout_s=1.0,
        api_tries=3,
        api_backoff_s=0.01,
        api_backoff_max_s=0.05,
        log_tail_lines=5,
    )


@pytest.fixture
async def make(server, cluster, k8s_settings):
    """Backends on the emulator (set up), cleaned up at the end."""
    made: list[KubernetesBackend] = []

    async def build(**changes) -> KubernetesBackend:
        settings = k8s_settings.model_copy(update=changes)
        backend = KubernetesBackend(
            settings, PUBLIC_URL, configuration=kubesim.configuration(server)
        )
        await backend.setup()
        made.append(backend)
        return backend

    yield build
    for backend in made:
        await backend.cleanup()


@pytest.fixture
async def backend(make) -> KubernetesBackend:
    return await make()
