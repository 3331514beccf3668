"""Where apps and jobs run: local processes or Kubernetes, behind one `Backend` class.

`dispatcher.backends.base.make_backend(settings)` picks one by
`settings.backend.kind`; handlers only ever see the `handlers.ports.Backend`
interface. This package imports nothing itself, so the job runner, which
runs as its own process for every run, starts quickly.
"""
