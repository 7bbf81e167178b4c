"""`specfleet simulate`: runs the five systems over steady and bursty traces at each replica count, scores the
autoscaling policies on a ramp and on every autoscaling trace x fleet scale, prints the tables and writes the JSON
report and PNG plots."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from specfleet_operator.simulator import autoscale as autoscaling
from specfleet_operator.simulator import report as reporting
from specfleet_operator.simulator.costs import DEFAULT_BENCH, PRESETS, get_preset, plain_capacity_tokens_per_s
from specfleet_operator.simulator.engine import ROUTINGS, assign_power_of_two, saturated_tokens_per_s, simulate
from specfleet_operator.simulator.systems import SYSTEMS, build
from specfleet_operator.simulator.traces import AUTOSCALE_TRACES, TRACES, make


def _int_list(text: str, least: int = 1, what: str = "replica counts") -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 10,100,1000, got {text!r}") \
            from None
    if not values or min(values) < least:
        raise argparse.ArgumentTypeError(f"{what} must be integers >= {least}, got {text!r}")
    return values


def _seed_list(text: str) -> list[int]:
    return _int_list(text, 0, "seeds")


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or '(none given)'}; choose from "
                                             f"{', '.join(allowed)} (comma-separated)")
        return values
    return parse


def run(preset: str = "a100-70b", replicas: tuple[int, ...] = (10, 100, 1000), traces: tuple[str, ...] = TRACES,
        systems: tuple[str, ...] = SYSTEMS, load: float = 0.7, duration_s: float = 60.0, seed: int = 0,
        autoscale: bool = True, autoscale_range: tuple[int, int] = (10, 1000), autoscale_duration_s: float = 3600.0,
        provision_s: float = 60.0, bench_dir: Path = DEFAULT_BENCH, profile: dict | None = None,
        routing: str = "random", progress: bool = True, autoscale_traces: tuple[str, ...] = AUTOSCALE_TRACES,
        autoscale_scales: tuple[int, ...] = (10, 100, 1000), autoscale_seeds: tuple[int, ...] = (0,)) -> dict:
    """The whole comparison as a JSON-ready report. Each (trace, replicas) pair uses one trace for all systems.
    With `autoscale`, the policies are scored on one ramp (`autoscale_range`) and on the grid of
    `autoscale_traces` x `autoscale_scales` (most replicas; the least is a tenth), averaged over `autoscale_seeds`."""
    from tqdm import tqdm

    costs = get_preset(preset, bench_dir)
    if profile is not None:
        from specfleet_operator.simulator.profile import apply_profile

        costs = apply_profile(costs, profile)
    capacity = plain_capacity_tokens_per_s(costs)
    plan = [(trace, r, system) for trace in traces for r in replicas for system in systems]
    rows, started = [], time.perf_counter()
    bar = tqdm(plan, desc="simulate", unit="run", disable=not progress)
    cache: dict = {}
    peak = {}  # one saturated replica per system: its capacity (replicas are independent, so R x this)
    for system in systems:
        peak[system] = saturated_tokens_per_s(build(system, costs), seed)
    for trace_kind, r, system in bar:
        bar.set_postfix_str(f"{trace_kind} x{r} {system}")
        key = (trace_kind, r)
        if key not in cache:
            rate = load * capacity * r / costs.request.output_tokens_mean
            trace = make(trace_kind, costs, rate, duration_s, seed + r)
            placement = None
            if routing == "p2c":
                placement = assign_power_of_two(trace, r, capacity, np.random.default_rng(seed + r))
            cache = {key: (trace, placement)}
        tick = time.perf_counter()
        trace, placement = cache[key]
        result = simulate(build(system, costs), trace, r, seed=seed, assign=placement)
        summary = result.summary()
        rows.append({**summary, "peak_tokens_per_s": round(peak[system] * r, 1),
                     "peak_tokens_per_gpu_s": round(peak[system] / max(summary["gpus"] / r, 1e-9), 2),
                     "wall_s": round(time.perf_counter() - tick, 3)})
    bar.close()
    report = {
        "config": {"preset": preset, "source": costs.source, "replicas": list(replicas), "traces": list(traces),
                   "systems": list(systems), "routing": routing, "load": load, "duration_s": duration_s, "seed": seed,
                   "plain_capacity_tokens_per_s_per_replica": round(capacity, 2),
                   "wall_s": round(time.perf_counter() - started, 2)},
        "costs": dataclasses.asdict(costs),
        "results": reporting.with_speedups(rows),
    }
    report["table_at_max_replicas"] = reporting.format_table(report["results"], max(replicas)).splitlines()
    if profile is not None:
        report["profile"] = profile
    if autoscale:
        low, high = autoscale_range
        fleet, slo_ms, scores = autoscaling.score_policies(costs, low, high, autoscale_duration_s, seed,
                                                            provision_s=provision_s)
        report["autoscale"] = {"system": "cosine", "min_replicas": low, "max_replicas": high,
                               "duration_s": autoscale_duration_s, "provision_s": provision_s,
                               "slo_ms_per_token": round(slo_ms, 3), "fleet": dataclasses.asdict(fleet),
                               "results": [s.summary() for s in scores],
                               "timelines": {s.policy: s.timeline for s in scores}}
        tick = time.perf_counter()
        rows = autoscaling.score_grid(costs, autoscale_traces, autoscale_scales, autoscale_seeds,
                                      autoscale_duration_s, provision_s, progress=progress)
        grid = {"traces": list(autoscale_traces),
                "scales": [list(autoscaling.scale_bounds(high)) for high in autoscale_scales],
                "seeds": list(autoscale_seeds), "duration_s": autoscale_duration_s, "provision_s": provision_s,
                "wall_s": round(time.perf_counter() - tick, 2), "rows": rows}
        grid["table"] = reporting.format_autoscale_grid(grid).splitlines()
        report["autoscale"]["grid"] = grid
    return report


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.reproduce:
        from specfleet_operator.simulator.reproduce import format_rows, reproduce

        print(format_rows(reproduce(args.bench)))
        return 0
    profile = None
    if args.profile:
        from specfleet_operator.simulator.profile import profile_models

        if args.preset != "local":
            raise SystemExit("--profile times the bundled models on this machine: use it with --preset local")
        profile = profile_models(args.models)
        print(json.dumps(profile, indent=1))
    report = run(args.preset, tuple(args.replicas), tuple(args.trace), tuple(args.systems), args.load,
                 args.duration, args.seed, autoscale=not args.no_autoscale,
                 autoscale_range=(args.autoscale_min, args.autoscale_max),
                 autoscale_duration_s=args.autoscale_duration, provision_s=args.provision_s, bench_dir=args.bench,
                 profile=profile, routing=args.routing, progress=not args.quiet,
                 autoscale_traces=tuple(args.autoscale_traces), autoscale_scales=tuple(args.autoscale_scales),
                 autoscale_seeds=tuple(args.autoscale_seeds))
    print(reporting.format_table(report["results"]))
    largest = max(args.replicas)
    print(f"\nat {largest} replicas:\n{reporting.format_table(report['results'], largest)}")
    if "autoscale" in report:
        print("\n" + reporting.format_autoscale(report["autoscale"]))
        print("\n" + "\n".join(report["autoscale"]["grid"]["table"]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    written = [args.output]
    if args.plot:
        written.append(reporting.plot_comparison(report, args.plot))
        if "autoscale" in report:
            written.append(reporting.plot_autoscale(report, args.plot.with_name(args.plot.stem + "-autoscale.png")))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def add_parsers(sub, fmt) -> None:
    """Registers `specfleet simulate` on the top-level subparsers."""
    p = sub.add_parser(
        "simulate", formatter_class=fmt,
        help="discrete-event simulation of CoSine, SpecInfer, PipeInfer, DSI and plain decoding at 10-1,000 replicas",
        description="Simulates plain decoding, coupled speculative inference (SpecInfer), PipeInfer, DSI and the "
                    "CoSine fleet on the same steady (Poisson) and bursty (Markov-modulated) traces at each replica "
                    "count, from a cost model: `local` reads this machine's committed benchmarks (bench/*.json), "
                    "`a100-70b` / `h100-70b` are paper-scale estimates (a 70B target on 4 GPUs, 1B drafters; "
                    "sources in docs/simulator.md). Prints throughput, p50 / p99 latency and speedup vs plain, then "
                    "scores autoscaling policies (static, threshold, HPA on GPU utilisation, KEDA on queue length, "
                    "Knative KPA, the operator) on a load ramp and on every autoscaling trace x fleet scale: SLO "
                    "attainment, GPU-hours, scaling actions, reversals, time from a surge to the first scale-up, p99 "
                    "latency per token.",
        epilog="Example: specfleet simulate --preset h100-70b --replicas 10,100 --trace bursty --duration 30")
    p.add_argument("--preset", choices=tuple(PRESETS), default="a100-70b", help="cost model")
    p.add_argument("--replicas", type=_int_list, default=[10, 100, 1000], help="comma-separated replica counts")
    p.add_argument("--trace", type=_choices(TRACES), default=list(TRACES), help="steady, bursty or both")
    p.add_argument("--systems", type=_choices(SYSTEMS), default=list(SYSTEMS), help="systems to compare")
    p.add_argument("--load", type=float, default=0.7,
                   help="offered load as a fraction of plain decoding's capacity at the same replica count")
    p.add_argument("--routing", choices=ROUTINGS, default="random",
                   help="placing requests on replicas: random (a Kubernetes Service) or p2c (a load-aware router: "
                        "the less loaded of two random replicas, by the work it has sent them)")
    p.add_argument("--duration", type=float, default=60.0, help="simulated seconds of arrivals per run")
    p.add_argument("--seed", type=int, default=0, help="seed for traces, routing and acceptance draws")
    p.add_argument("--no-autoscale", action="store_true", help="skip the autoscaling-policy scoring")
    p.add_argument("--autoscale-min", type=int, default=10, help="fewest verifiers the policies may run")
    p.add_argument("--autoscale-max", type=int, default=1000, help="most verifiers the policies may run")
    p.add_argument("--autoscale-duration", type=float, default=3600.0,
                   help="seconds of the up-and-down ramp and of every autoscaling trace but ramp-5m")
    p.add_argument("--autoscale-traces", type=_choices(AUTOSCALE_TRACES), default=list(AUTOSCALE_TRACES),
                   help="traces of the autoscaling grid")
    p.add_argument("--autoscale-scales", type=_int_list, default=[10, 100, 1000],
                   help="fleet scales of the autoscaling grid, as most verifiers (the least is a tenth, at least 1)")
    p.add_argument("--autoscale-seeds", type=_seed_list, default=[0],
                   help="seeds the autoscaling grid averages over (e.g. 0,1,2: three times as long)")
    p.add_argument("--provision-s", type=float, default=60.0, help="seconds before a new GPU pod serves")
    p.add_argument("--profile", action="store_true",
                   help="with --preset local: time the bundled models now instead of using bench/*.json steps")
    p.add_argument("--reproduce", action="store_true",
                   help="only replay this machine's measured runs (bench/fleet.json, bench/profile.json) through the "
                        "simulator and print measured vs simulated tokens/s per figure")
    p.add_argument("--models", type=Path, default=DEFAULT_BENCH.parent / "models", help="bundled models (--profile)")
    p.add_argument("--bench", type=Path, default=DEFAULT_BENCH, help="folder of the committed benchmark JSON")
    p.add_argument("--output", type=Path, default=DEFAULT_BENCH / "simulate.json", help="JSON report")
    p.add_argument("--plot", type=lambda text: Path(text) if text else None, default=DEFAULT_BENCH / "simulate.png",
                   help="PNG of the comparison (and NAME-autoscale.png); empty to skip")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specfleet")
    add_parsers(parser.add_subparsers(dest="command", required=True), argparse.ArgumentDefaultsHelpFormatter)
    args = parser.parse_args(["simulate", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
