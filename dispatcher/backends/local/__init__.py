"""The local backend: viz apps and runs as processes on this machine.

This package imports nothing itself, so the job runner (`python -m
dispatcher.backends.local.jobrunner`), which starts once per run, starts quickly."""
