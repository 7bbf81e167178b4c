"""`specfleet bench engine|fleet|reliability|autoscale`: benchmarks that print and write JSON, ratios measured side
by side in one run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from specfleet.cli.options import DEFAULT_BENCH, DEFAULT_MODELS, fleet_bench_options, positive_int


def cmd_bench_engine(args) -> int:
    from specfleet.bench.engine_bench import format_table, run

    try:
        report = run(args.models, args.prompts, args.max_new_tokens, args.limit, args.output,
                     batches=tuple(args.batches))
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    print(format_table(report))
    print(f"\nwrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


def cmd_bench_fleet(args) -> int:
    from specfleet.bench.fleet_bench import format_table, run

    try:
        stages = tuple(x.strip() for x in args.stages.split(",") if x.strip())
        unknown = set(stages) - {"overhead", "throughput", "ablation", "dsi"}
        if unknown or not stages:
            raise ValueError(f"--stages takes overhead, throughput, ablation, dsi; got {args.stages!r}")
        hop_models = ("bundled", "tiny") if args.hop_models == "both" else (args.hop_models,)
        baseline = None
        if args.baseline is not None:
            baseline = json.loads(args.baseline.read_text())
            if "round_hops" not in baseline:
                raise ValueError(f"{args.baseline} has no round_hops: give a report of --stages overhead")
        report = run(args.models, args.redis_url, args.max_new_tokens, args.limit, args.output,
                     concurrency=tuple(args.concurrency), stages=stages,
                     ablation_concurrency=args.ablation_concurrency, hop_models=hop_models,
                     hop_concurrency=tuple(args.hop_concurrency), baseline=baseline)
    except (ValueError, FileNotFoundError, OSError) as exc:
        sys.exit(f"error: {exc}")
    print(format_table(report))
    print(f"\nwrote {args.output}")
    return 0


def cmd_bench_autoscale(args) -> int:
    from specfleet.bench.autoscale_bench import format_table, run

    try:
        ramp = tuple(int(x) for x in args.ramp.split(","))
        if not ramp or min(ramp) < 0:
            raise ValueError(f"--ramp wants comma-separated client counts >= 0, got {args.ramp!r}")
        report = run(args.models, args.redis_url, args.output, ramp, args.phase_s, args.max_new_tokens, args.pools,
                     args.max_verifiers, args.interval)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
    print(format_table(report))
    print(f"\nwrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


def cmd_bench_reliability(args) -> int:
    from specfleet.bench.reliability import format_table, run

    try:
        report = run(args.models, args.redis_url, args.output, streams=args.streams, seconds=args.seconds)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
    print(format_table(report))
    print(f"\nwrote {args.output}")
    return 0 if report["faults"]["requests_lost"] == report["server_crashes"] == 0 else 1



def add_parser(sub, fmt) -> None:
    p = sub.add_parser("bench", help="benchmarks that print and write JSON (ratios measured side by side)")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    b = bsub.add_parser("engine", formatter_class=fmt,
                        help="tokens/s of specfleet's proposers vs its own plain decoding (and vs HF generate)",
                        description="Measures, in one run on the same held-out prompts: specfleet-none/model/suffix/"
                                    "fused at batch 1 and a batch sweep of specfleet-fused, greedy and sampled "
                                    "(T=0.8, top-p 0.95), each against the same engine's plain decoding "
                                    "(specfleet-none) at the same batch and mode, with accepted tokens per round and "
                                    "distinct-4 beside it; hf-greedy, hf-assisted (the prompt's domain drafter) and "
                                    "hf-prompt-lookup as secondary rows. Writes JSON and a PNG plot.")
    b.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of bundled models")
    b.add_argument("--prompts", type=Path, default=None,
                   help="JSONL with \"prompt\" (and \"domain\") per line (default: the held-out set in "
                        "specfleet/bench/prompts.py)")
    b.add_argument("--limit", type=positive_int, default=24, help="prompts used (round-robin over domains)")
    b.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens per prompt")
    b.add_argument("--batches", type=positive_int, nargs="+", default=[1, 4, 16, 32],
                   help="batch sweep (batched rows use at least as many prompts as the largest batch)")
    b.add_argument("--output", type=Path, default=DEFAULT_BENCH / "engine.json", help="JSON result (+ .png)")
    b.set_defaults(func=cmd_bench_engine)
    b = bsub.add_parser("fleet", formatter_class=fmt,
                        help="the fleet's per-round overhead and throughput vs the engine",
                        description="Plain decoding through the in-process engine and through the fleet (gRPC + "
                                    "Redis) for the per-round overhead (p50/p99), then throughput at each "
                                    "concurrency, fleet vs engine, same models and held-out prompts.")
    fleet_bench_options(b)
    b.add_argument("--limit", type=positive_int, default=12, help="prompts")
    b.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens per prompt")
    b.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 8, 32], help="concurrent streams")
    b.add_argument("--stages", default="overhead,throughput,ablation,dsi",
                   help="comma-separated: overhead (per-round gRPC + Redis cost, and the round trip hop by hop: "
                        "router planning, drafter RPCs, fusion, verify queue, batch wait, forward, commit, answer, "
                        "delivery, p50/p99 each, compute apart from orchestration), throughput (fleet vs engine), "
                        "ablation (each CoSine switch off in turn, greedy and sampled), dsi (two verifiers with "
                        "speculation parallelism on and off, stream and gRPC verify queues, at concurrency 1 and 8)")
    b.add_argument("--ablation-concurrency", type=positive_int, default=8, help="streams at a time in the ablation")
    b.add_argument("--hop-models", choices=("bundled", "tiny", "both"), default="both",
                   help="overhead stage: the models of the hop-by-hop run (tiny: a 1-layer target and drafters with "
                        "random weights on the bundled tokenizer, built into a temporary folder, so that compute "
                        "does not hide the orchestration)")
    b.add_argument("--hop-concurrency", type=positive_int, nargs="+", default=[1, 8],
                   help="overhead stage: concurrent streams of the hop-by-hop run")
    b.add_argument("--baseline", type=Path, default=None,
                   help="overhead stage: an earlier report of it; its hop tables go beside this run's (\"before\")")
    b.add_argument("--output", type=Path, default=DEFAULT_BENCH / "fleet.json", help="JSON result")
    b.set_defaults(func=cmd_bench_fleet)
    b = bsub.add_parser("reliability", formatter_class=fmt, help="faults, bad input and load against the fleet",
                        description="The fleet as one process per service: kill -9 of a drafter, fusion, a verifier "
                                    "and the router, SIGSTOP of a verifier and a restart of the fleet's own persistent "
                                    "Redis mid-stream (outputs vs the unfaulted run), a fuzz of the gRPC and HTTP "
                                    "APIs, then a bounded load run with each "
                                    "service's memory before and after. Exits 1 when a request was lost or a server "
                                    "crashed.")
    fleet_bench_options(b)
    b.add_argument("--streams", type=positive_int, default=200, help="concurrent streams in the load run")
    b.add_argument("--seconds", type=float, default=60.0, help="how long the load run sends new requests")
    b.add_argument("--output", type=Path, default=DEFAULT_BENCH / "reliability.json", help="JSON result")
    b.set_defaults(func=cmd_bench_reliability)

    b = bsub.add_parser("autoscale", formatter_class=fmt,
                        help="a load ramp up and down on `specfleet up --autoscale`: replicas over time, nothing lost",
                        description="Starts the local fleet with the operator's autoscaling loop, ramps concurrent "
                                    "clients up and down, samples replicas per role from Redis heartbeats, and checks "
                                    "that no request is lost and every output equals the target's greedy decoding.")
    fleet_bench_options(b)
    b.add_argument("--ramp", default="1,4,12,12,4,1,0,0", help="concurrent clients in each phase")
    b.add_argument("--phase-s", type=float, default=20.0, help="seconds per phase")
    b.add_argument("--max-new-tokens", type=positive_int, default=24, help="tokens per request")
    b.add_argument("--pools", default="suffix", help="drafter pools")
    b.add_argument("--max-verifiers", type=positive_int, default=3, help="most verifier processes")
    b.add_argument("--interval", type=float, default=1.0, help="seconds between autoscaling steps")
    b.add_argument("--output", type=Path, default=DEFAULT_BENCH / "autoscale.json", help="JSON result (+ .png)")
    b.set_defaults(func=cmd_bench_autoscale)
