"""kubesim: a Kubernetes API server and cluster, simulated in-process, for tests and benchmarks.

A development tool, not part of spinyard: it is not in the wheel (pyproject
lists the shipped packages) and needs the `dev` extra (kmock). The tests of
the Kubernetes backend and `bench/k8s_sim.py` run the backend against it.

- `apiserver`: `Apiserver`, kmock's API emulator with resourceVersions,
  label selectors, paging, resumable watches and injected failures;
  `apiserver()` starts one on a loopback port, `configuration()` points the
  official client at it.
- `controllers`: `Cluster`, the Deployment and Job controllers, the garbage
  collector and the kubelet, simulated over HTTP.
- `processes`: the kubelet's real half: bare pods (warm runners) run as local
  processes at loopback pod IPs.
- `selectors`: label and field selectors, as the API server applies them.
- `kubelet_events`: the Events a kubelet reports about a failed readiness
  probe (reason Unhealthy), worded as kubelet's.
- `kubelet_env`: a container's environment as a kubelet fills it, reading
  `secretKeyRef` variables from their Secrets.
"""

from kubesim.apiserver import NAMESPACE, Apiserver, apiserver, configuration, ref
from kubesim.controllers import Cluster

__all__ = ["NAMESPACE", "Apiserver", "Cluster", "apiserver", "configuration", "ref"]
