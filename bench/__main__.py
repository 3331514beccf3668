"""Command line of the benchmarks: pick benches, print their tables, optionally write JSON.

    python -m bench                      # all benches, full sizes
    python -m bench viz --quick          # one bench, small sizes
    python -m bench viz runs             # several
    python -m bench sporadic --loads 60  # page loads at random gaps, p99 against p50
    python -m bench fanout --streams 10000  # SSE fan-out: 10,000 streams on one gateway
    python -m bench handlers             # one handler process's events/s, against raw pull + ack
    python -m bench gateway              # HTTP + SSE through the gateway, against raw aiohttp
    python -m bench all --json out.json

`all` runs viz, sporadic, runs, fanout, handlers, gateway and, when bench/k8s_sim.py
exists, the Kubernetes simulation (`k8s`, through its `main(argv)`). Each bench is a function
`(quick: bool) -> dict` that prints its own tables. A bench that cannot run
prints why (an exception, or `errors` in the dict it returns); the exit
status is then 1.
"""

import argparse
import importlib
import importlib.util
import json
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import stats
from bench.stack import BenchError
from dispatcher import logs

K8S_MODULE = "bench.k8s_sim"


def k8s_bench(quick: bool) -> dict:
    """bench/k8s_sim.py through its own command line (`main(argv)`), its JSON read back."""
    module = importlib.import_module(K8S_MODULE)
    with tempfile.TemporaryDirectory(prefix="spinyard-bench-k8s-") as tmp:
        out = Path(tmp) / "k8s.json"
        code = module.main([*(["--quick"] if quick else []), "--json", str(out)])
        result = json.loads(out.read_text()) if out.exists() else {}
    if code:
        result["errors"] = [f"{K8S_MODULE}.main exited with {code}"]
    return result


def benches() -> dict[str, Callable]:
    from bench import fanout, gateway, handlers, runs, sporadic, viz

    found = {
        "viz": viz.main,
        "sporadic": sporadic.main,
        "runs": runs.main,
        "fanout": fanout.main,
        "handlers": handlers.main,
        "gateway": gateway.main,
    }
    if importlib.util.find_spec(K8S_MODULE) is not None:  # written separately; optional
        found["k8s"] = k8s_bench
    return found


def main(argv: list[str] | None = None) -> int:
    available = benches()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "bench", nargs="*", default="all", choices=[*available, "all"], help="default: all"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a minute or so)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--loads",
        type=int,
        metavar="N",
        help="sporadic: timed page loads (default 40, --quick 15; about 1.5 s each)",
    )
    parser.add_argument(
        "--streams",
        type=int,
        metavar="N",
        help="fanout: SSE streams opened on one gateway (default 1000, --quick 100)",
    )
    args = parser.parse_args(argv)
    logs.configure("console", "warning")

    chosen = [args.bench] if isinstance(args.bench, str) else args.bench  # the default is a str
    names = list(available) if "all" in chosen else list(dict.fromkeys(chosen))
    info = stats.machine()
    print(
        f"{info['date']}: {info['nproc']} CPUs, Python {info['python']}, "
        f"load average {info['loadavg_1m']:.2f} ({info['platform']})",
        flush=True,
    )
    results: dict[str, object] = {}
    status = 0
    for name in names:
        print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
        try:
            options = {}
            if name == "sporadic" and args.loads:
                options["loads"] = args.loads
            if name == "fanout" and args.streams:
                options["streams"] = args.streams
            result = results[name] = available[name](quick=args.quick, **options)
            if isinstance(result, dict) and result.get("errors"):
                print(f"{name}: FAILED: {'; '.join(result['errors'])}", file=sys.stderr)
                status = 1
        except BenchError as exc:
            print(f"{name}: FAILED: {exc}", file=sys.stderr, flush=True)
            results[name] = {"error": str(exc)}
            status = 1
        except Exception as exc:
            traceback.print_exc()
            results[name] = {"error": repr(exc)}
            status = 1
        print(flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
