"""Where apps and jobs run: local processes or Kubernetes, behind one `Backend` class.

`make_backend(settings)` picks one by `settings.backend.kind`; handlers only
ever see the `handlers.ports.Backend` interface.
"""

from dispatcher.backends.base import Backend, Instance, JobLaunch, make_backend

__all__ = ["Backend", "Instance", "JobLaunch", "make_backend"]
