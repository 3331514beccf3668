# spinyard tasks. Run through ./just on a fresh machine; it bootstraps the venv.
set shell := ["bash", "-euo", "pipefail", "-c"]
# Recipe arguments reach commands as "$@", each one word (`./just test -k "a or b"`).
set positional-arguments

py := ".venv/bin/python"

# List the recipes
default:
    @./just --list

# (Skipped while pyproject.toml is unchanged since the last install.)
# Install spinyard and its dev, demo and frameworks extras into .venv
install:
    [ -x {{py}} ] || python3 -m venv .venv
    [ .venv/.installed-dev -nt pyproject.toml ] || { {{py}} -m pip install -q --disable-pip-version-check -e '.[dev,demo,frameworks]' && touch .venv/.installed-run .venv/.installed-dev; }

# (Not the dev tools; skipped while pyproject.toml is unchanged since the last install.)
# Install what `up` needs, spinyard and the example apps' extras, showing pip's progress
install-run:
    [ -x {{py}} ] || python3 -m venv .venv
    [ .venv/.installed-run -nt pyproject.toml ] || { echo "installing spinyard and the demo apps' packages into .venv ..."; {{py}} -m pip install --disable-pip-version-check --progress-bar on -e '.[demo,frameworks]' && touch .venv/.installed-run; }

# (`./just up` runs `spinyard up` itself after `install-run`, so Ctrl-C exits 0; see ./just)
# Start the embedded stack (nats-server, handlers, gateway, local backend) with the examples
up *ARGS: install-run
    .venv/bin/spinyard up "$@"

# Run the whole test suite (real nats-server, S3 server and Chromium, started by the tests)
test *ARGS: install
    # The browser tests drive Debian's Chromium; install it if it is missing (they fail without).
    [ -x /usr/bin/chromium ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "could not install chromium: the browser tests will fail"
    # Only the pytest plugins the suite uses load: another package's plugin in the venv
    # (Dash's, say, which trips filterwarnings = error) cannot change the run.
    PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {{py}} -m pytest -p pytest_asyncio.plugin -p kmock._internal.pytest -p _hypothesis_pytestplugin "$@"

# Lint, format check and the import-layer contract
lint: install
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/lint-imports

# Benchmarks (see docs/benchmarks.md); installs the bench extra
bench *ARGS: install
    # --help only prints: nothing more is installed for it.
    case " $* " in *" --help "*|*" -h "*) exec {{py}} -m bench "$@";; esac; \
    {{py}} -m pip install -q --disable-pip-version-check -e '.[bench]'; \
    command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; } || echo "no redis-server: the Celery half of the runs bench will say so"; \
    {{py}} -m bench "$@"
