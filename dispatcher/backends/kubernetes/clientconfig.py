"""Where the Kubernetes backend's client configuration comes from: the pod's service
account when spinyard runs in a cluster, else a kubeconfig (file and context from the
settings). Loaded when the backend connects, never at import."""

from kubernetes import client, config

from dispatcher.backends.settings import KubernetesBackendSettings


def load_configuration(settings: KubernetesBackendSettings) -> client.Configuration:
    """In-cluster configuration if spinyard runs in a pod, else the kubeconfig's.

    Raises:
        kubernetes.config.ConfigException: neither is available.
    """
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg, try_refresh_token=True)
    except config.ConfigException:
        config.load_kube_config(
            config_file=str(settings.kubeconfig) if settings.kubeconfig else None,
            context=settings.context,
            client_configuration=cfg,
            persist_config=False,
        )
    return cfg
