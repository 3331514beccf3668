"""The runs bench's report: spinyard / Celery ratios and the printed tables (`bench.runs`)."""

from bench import stats


def pairs(sp: dict, ce: dict) -> list[dict]:
    """spinyard / Celery for the like-for-like figures."""
    warm = sp.get("warm", {})
    lat = {r["name"]: r for r in sp["latency"] + warm.get("latency", []) + ce["latency"]}
    rate = {r["name"]: r for r in sp["rates"] + warm.get("rates", []) + ce["rates"]}
    pairs = []
    for mine, theirs in [
        ("run request -> running", "submit -> task start"),
        ("run request -> succeeded", "submit -> result received"),
        ("run request -> running (warm pool)", "submit -> task start"),
    ]:
        for q in ("p50_ms", "p99_ms"):
            a, b = lat[mine][q], lat[theirs][q]
            pairs.append({"name": f"{mine} / {theirs} ({q})", "spinyard": a, "celery": b})
    for mine, theirs in [
        ("published (JetStream acks)", "submitted (apply_async returned)"),
        ("queued (run_request handled)", "submitted (apply_async returned)"),
        ("running (or already ended)", "started (task body began)"),
        ("ended (succeeded)", "completed (results received)"),
        ("running (or already ended) (warm pool)", "started (task body began)"),
        ("first 100 running (warm pool)", "started (task body began)"),
        ("ended (succeeded) (warm pool)", "completed (results received)"),
    ]:
        if mine not in rate:  # a quick run's pool is smaller than 100
            continue
        a, b = rate[mine]["per_s"], rate[theirs]["per_s"]
        pairs.append({"name": f"{mine} / {theirs} (per s)", "spinyard": a, "celery": b})
    for p in pairs:
        p["ratio"] = stats.ratio(p["spinyard"], p["celery"])
    return pairs


def floor(sp: dict, raw: dict) -> list[dict]:
    """spinyard's warm start / the same bus round trips in plain nats-py (`bench.chain_peer`)."""
    mine = {r["name"]: r for r in sp.get("warm", {}).get("latency", [])}
    theirs = {r["name"]: r for r in raw["latency"]}
    rows = []
    for a, b in [
        ("run request -> queued (warm pool)", "raw hops: request -> queued"),
        ("run request -> running (warm runs only)", "raw hops: request -> running"),
    ]:
        if a in mine and b in theirs and mine[a]["n"]:
            x, y = mine[a]["p50_ms"], theirs[b]["p50_ms"]
            rows.append({"name": f"{a} / {b} (p50_ms)", "spinyard": x, "raw": y})
    for row in rows:
        row["ratio"] = stats.ratio(row["spinyard"], row["raw"])
    return rows


def format_result(result: dict) -> str:
    lines = ["runs: run request -> running and runs per second, spinyard and Celery (same run)"]
    for part in ("spinyard", "celery"):
        if part not in result:
            continue
        figures = result[part]
        note = figures.get("worker") or (
            f"local backend state in {figures['state']}" if "state" in figures else ""
        )
        lines.append(f"-- {part}" + (f" ({note})" if note else ""))
        if "error" in figures:
            lines.append(f"   FAILED: {figures['error']}")
            continue
        lines.append(stats.table(figures["latency"], stats.LATENCY_COLUMNS[:4]))
        lines.append(stats.table(figures["rates"], stats.RATE_COLUMNS))
        if warm := figures.get("warm"):
            lines.append(
                f"-- {part}, warm pools: sequential runs warm {warm['sequential_warm']}; "
                f"burst runs warm {warm['burst_warm']} (pool {warm['pool']}, "
                f"filled in {warm['pool_fill_s']:.1f} s)"
            )
            lines.append(stats.table(warm["latency"], stats.LATENCY_COLUMNS[:4]))
            lines.append(stats.table(warm["rates"], stats.RATE_COLUMNS))
    if raw := result.get("raw_hops"):
        lines.append("-- the same bus round trips in plain nats-py (bench.chain_peer)")
        if "error" in raw:
            lines.append(f"   FAILED: {raw['error']}")
        else:
            lines.append(stats.table(raw["latency"], stats.LATENCY_COLUMNS[:4]))
    if "floor" in result:
        lines.append("-- spinyard's warm start / the raw hops")
        columns = (("figure", "name"), ("spinyard", "spinyard"), ("raw", "raw"))
        lines.append(stats.table(result["floor"], (*columns, ("ratio", "ratio"))))
    if "ratios" in result:
        lines.append("-- spinyard / celery")
        columns = (("figure", "name"), ("spinyard", "spinyard"), ("celery", "celery"))
        lines.append(stats.table(result["ratios"], (*columns, ("ratio", "ratio"))))
    lines.append(stats.load_line(result))
    return "\n".join(lines)
