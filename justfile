# spinyard tasks. Run through ./just on a fresh machine; it bootstraps the venv.
set shell := ["bash", "-euo", "pipefail", "-c"]

py := ".venv/bin/python"

# List the recipes
default:
    @./just --list

# Install spinyard and its dev and demo extras into .venv (quick when already done)
install:
    [ -x {{py}} ] || python3 -m venv .venv
    {{py}} -m pip install -q --disable-pip-version-check -e '.[dev,demo]'

# Start the embedded stack (nats-server, handlers, gateway, local backend) with the examples
# (`./just up` runs `spinyard up` itself after `install`, so Ctrl-C exits 0; see ./just)
up *ARGS: install
    .venv/bin/spinyard up {{ARGS}}

# Run the whole test suite (real nats-server, S3 server and Chromium, started by the tests)
test *ARGS: install
    # The browser tests drive Debian's Chromium; install it if it is missing (they fail without).
    [ -x /usr/bin/chromium ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "could not install chromium: the browser tests will fail"
    {{py}} -m pytest {{ARGS}}

# Lint, format check and the import-layer contract
lint: install
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/lint-imports

# Benchmarks (see docs/benchmarks.md); installs the bench extra
bench *ARGS: install
    {{py}} -m pip install -q --disable-pip-version-check -e '.[bench]'
    # Celery's broker for the runs bench: Debian's redis-server, if it is missing.
    command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; } || echo "no redis-server: the Celery half of the runs bench will say so"
    {{py}} -m bench {{ARGS}}
