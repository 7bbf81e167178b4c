"""The memory soak (`make soak`): the reliability benchmark's load (concurrent SDK streams sending greedy requests back
to back, outputs checked against the unloaded run) held for a long time against the fleet as real processes, with
every service's RSS sampled all along, and the fleet's Redis counted when it is done (keys by kind, orphans,
verify-stream entries: `bench.leaks.settled_census`). A leak shows as a steady slope; the report gives each
service's growth and its least-squares slope over the run after a warm-up (caches, allocator pools and first-shape
compilation fill then), and calls the run flat when no slope passes `--max-slope-mb-per-min`.

    python -m specfleet.bench.soak --seconds 1800 --streams 200 --output bench/reliability-soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from specfleet.bench.leaks import settled_census
from specfleet.bench.reliability import (
    PersistentRedis,
    bench_fleet,
    bench_prompts,
    bench_slots,
    load_run,
    stream_with_fault,
)

DEFAULT_OUTPUT = Path("bench/reliability-soak.json")


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per minute (None with fewer than 3 points)."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60.0 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def memory_summary(samples: list[dict], warmup_s: float, max_slope: float) -> dict:
    """Per service: RSS at the start, after the warm-up and at the end, growth after the warm-up, and its slope."""
    names = sorted({name for s in samples for name in s["rss_mb"]})
    services = {}
    for name in names:
        points = [(s["t_s"], s["rss_mb"][name]) for s in samples if s["rss_mb"].get(name) is not None]
        steady = [p for p in points if p[0] >= warmup_s] or points
        if not points:
            continue
        slope = slope_per_min(steady)
        services[name] = {"start_mb": points[0][1], "after_warmup_mb": steady[0][1], "end_mb": points[-1][1],
                          "peak_mb": max(v for _, v in points), "growth_after_warmup_mb": round(steady[-1][1] -
                                                                                                steady[0][1], 1),
                          "slope_mb_per_min": None if slope is None else round(slope, 3)}
    slopes = [s["slope_mb_per_min"] for s in services.values() if s["slope_mb_per_min"] is not None]
    return {"warmup_s": warmup_s, "max_slope_mb_per_min": max_slope, "services": services,
            "worst_slope_mb_per_min": max(slopes, default=None),
            "flat": bool(slopes) and max(slopes) <= max_slope}


def run(models_dir: Path, output: Path, seconds: float = 1800.0, streams: int = 200, new_tokens: int = 16,
        sample_s: float = 5.0, warmup_frac: float = 0.2, max_slope: float = 1.0, rpc_timeout: float = 30.0,
        progress: bool = True) -> dict:
    def say(text: str) -> None:
        if progress:
            print(f"[soak] {text}", file=sys.stderr, flush=True)

    prompts = bench_prompts(models_dir)
    token = os.urandom(12).hex()
    slots = bench_slots(streams)  # as `bench reliability`: every live request keeps its KV cache
    say("starting the fleet: drafters python, prose; fusion; 2 verifiers; router (one process each), own Redis")
    with PersistentRedis() as redis, bench_fleet(models_dir, redis, redis.url, token, streams, rpc_timeout) as fleet:
        baseline = [stream_with_fault(fleet.router_address, ids, new_tokens, token=token).tokens for ids in prompts]
        samples: list[dict] = []
        done = threading.Event()
        start = time.monotonic()

        def sample() -> None:
            while True:
                samples.append({"t_s": round(time.monotonic() - start, 1), "rss_mb": fleet.rss_mb()})
                if done.wait(sample_s):
                    samples.append({"t_s": round(time.monotonic() - start, 1), "rss_mb": fleet.rss_mb()})
                    return

        sampler = threading.Thread(target=sample, name="soak-rss", daemon=True)
        sampler.start()
        say(f"load: {streams} concurrent streams for {seconds:.0f} s, RSS every {sample_s:g} s")
        try:
            load = load_run(fleet, prompts, baseline, streams, seconds, new_tokens)
        finally:
            done.set()
            sampler.join(timeout=30)
        crashed = fleet.crashed()
        redis_counts = settled_census(redis.url, fleet.prefix)  # every client call has returned: 0 live
    report = {
        "config": {"fleet": "one `specfleet serve` process per service on loopback, SDK clients with retries",
                   "pools": ["python", "prose"], "verifiers": 2, "fusion": True, "streams": streams,
                   "seconds": seconds, "max_new_tokens": new_tokens, "sample_s": sample_s, "slots": slots,
                   "router_rpc_timeout_s": rpc_timeout, "cpu_count": os.cpu_count(),
                   "redis": "own redis-server (appendonly yes, appendfsync always)"},
        "load": load,
        "server_crashes": len(crashed), "crashed": crashed,
        "redis": redis_counts,
        "memory": memory_summary(samples, round(warmup_frac * load["seconds"], 1), max_slope),
        "rss_samples": samples,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: dict) -> str:
    load, mem = report["load"], report["memory"]
    lines = [f"load: {load['streams']} streams for {load['seconds']} s: {load['completed']} requests, "
             f"{load['errors']} errors, {load.get('retries', 0)} retries, {load['outputs_differing']} differing, "
             f"p50 {load['latency_ms']['p50']} ms, "
             f"p99 {load['latency_ms']['p99']} ms; server crashes {report['server_crashes']}",
             f"memory after a {mem['warmup_s']:.0f} s warm-up ({'flat' if mem['flat'] else 'NOT flat'}: worst slope "
             f"{mem['worst_slope_mb_per_min']} MB/min, limit {mem['max_slope_mb_per_min']}):"]
    lines += [f"  {name:<16} {s['after_warmup_mb']:>8.1f} -> {s['end_mb']:>8.1f} MB  "
              f"({s['growth_after_warmup_mb']:+.1f} MB, {s['slope_mb_per_min']} MB/min)"
              for name, s in mem["services"].items()]
    if "redis" in report:
        found = report["redis"]
        kinds = ", ".join(f"{k} {n}" for k, n in found["by_kind"].items())
        lines.append(f"redis after the load: {found['keys']} keys ({kinds}), requests {found['requests']}, orphans "
                     f"{found['orphans']}, verify stream pending {found['verify_pending']} waiting "
                     f"{found['verify_undelivered']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m specfleet.bench.soak", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Memory soak: the reliability load held for --seconds against the fleet as one process per "
                    "service, RSS of every service sampled every --sample-s; writes the samples, each service's "
                    "growth and slope after the warm-up, and whether memory stayed flat. Exits 1 on errors, "
                    "differing outputs, a crashed server, a slope above --max-slope-mb-per-min, or a Redis key "
                    "left without a TTL (an orphan) or a verify-stream entry left pending once the load is done.")
    parser.add_argument("--models", type=Path, default=Path(__file__).resolve().parents[3] / "models",
                        help="folder of bundled models")
    parser.add_argument("--seconds", type=float, default=1800.0, help="how long the load sends new requests")
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per request")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--warmup-frac", type=float, default=0.2,
                        help="leading fraction of the run left out of the growth and slope")
    parser.add_argument("--max-slope-mb-per-min", type=float, default=1.0,
                        help="a service whose RSS grows faster than this after the warm-up fails the soak")
    parser.add_argument("--rpc-timeout", type=float, default=30.0, help="the router's deadline per internal call")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON result")
    args = parser.parse_args(argv)
    for name in ("seconds", "streams", "max_new_tokens", "sample_s"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if not 0 <= args.warmup_frac < 1:
        parser.error("--warmup-frac must be in [0, 1)")
    try:
        report = run(args.models, args.output, args.seconds, args.streams, args.max_new_tokens, args.sample_s,
                     args.warmup_frac, args.max_slope_mb_per_min, args.rpc_timeout)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
    print(format_table(report))
    print(f"\nwrote {args.output}")
    load = report["load"]
    ok = not load["errors"] and not load["outputs_differing"] and not report["server_crashes"] and \
        report["memory"]["flat"] and report["redis"]["leak_free"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
