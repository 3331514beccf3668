"""Where apps and jobs run: `local` processes or `kubernetes`, behind one `Backend` class.

`base.py` holds what both agree on, `local/` and `kubernetes/` one backend
each (neither imports the other; `./just lint` checks it). The composition
root, `dispatcher.compose.make_backend`, picks one by `settings.backend.kind`;
handlers only ever see the `handlers.ports.Backend` interface. This package
imports nothing itself, so the job runner, a process of its own per run,
starts quickly.
"""
