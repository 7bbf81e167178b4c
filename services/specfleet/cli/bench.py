"""`specfleet bench engine|gpu|fleet|reliability|fuzz|autoscale`: benchmarks that print and write JSON, ratios
measured side by side in one run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from specfleet.cli.options import (
    DEFAULT_BENCH,
    DEFAULT_MODELS,
    REPO_ROOT,
    device_option,
    fleet_bench_options,
    positive_int,
)


def cmd_bench_engine(args) -> int:
    from specfleet.bench.engine_bench import format_table, run

    try:
        report = run(args.models, args.prompts, args.max_new_tokens, args.limit, args.output,
                     batches=tuple(args.batches), systems=tuple(args.systems.split(",")) if args.systems else None,
                     device=args.device, dtype=args.dtype)
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
        ramp = _ints(args.ramp, "--ramp")
        if not ramp or min(ramp) < 0:
            raise ValueError(f"--ramp wants comma-separated client counts >= 0, got {args.ramp!r}")
        stages = tuple(x.strip() for x in args.stages.split(",") if x.strip())
        if not stages or set(stages) - {"ramp", "burst"} or len(set(stages)) != len(stages):
            raise ValueError(f"--stages takes burst and/or ramp, each once, in the order to run; got {args.stages!r}")
        burst = _ints(args.burst, "--burst")
        if len(burst) != 2 or not 1 <= burst[0] < burst[1]:
            raise ValueError(f"--burst wants BASE,PEAK clients with 1 <= BASE < PEAK, got {args.burst!r}")
        try:
            burst_s = tuple(float(x) for x in args.burst_s.split(","))
        except ValueError:
            burst_s = ()
        if len(burst_s) != 3 or min(burst_s) <= 0:
            raise ValueError(f"--burst-s wants three positive seconds BASE,PEAK,AFTER, got {args.burst_s!r}")
        if args.phase_s <= 0 or args.interval <= 0 or args.settle_s < 0:
            raise ValueError("--phase-s and --interval must be > 0, --settle-s >= 0")
        report = run(args.models, args.redis_url, args.output, ramp, args.phase_s, args.max_new_tokens, args.pools,
                     args.max_verifiers, args.interval, stages=stages, burst=burst, burst_s=burst_s,
                     settle_s=args.settle_s)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
    print(format_table(report))
    print(f"\nwrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} wants comma-separated whole numbers, got {text!r}") from None


def cmd_bench_reliability(args) -> int:
    from specfleet.bench.reliability import format_table, run

    try:
        stages = tuple(x.strip() for x in args.stages.split(",") if x.strip())
        if args.under_load and "faults-under-load" not in stages:
            stages += ("faults-under-load",)
        if not (args.deadline > 0 and args.outage_s >= 0):
            raise ValueError(f"--deadline must be > 0 and --outage-s >= 0, got {args.deadline} and {args.outage_s}")
        report = run(args.models, args.redis_url, args.output, streams=args.streams, seconds=args.seconds,
                     load_tokens=args.load_tokens, stages=stages, deadline_s=args.deadline, outage_s=args.outage_s,
                     rolling_streams=args.rolling_streams, rolling_tokens=args.rolling_tokens)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
    print(format_table(report))
    print(f"\nwrote {args.output}")
    under_load = report.get("faults_under_load", {})
    # a fault under load not survived: not injected mid-run, or a request lost, differing or late, or a crash
    lost = (report.get("faults", {}).get("requests_lost", 0)
            + len(under_load.get("runs", ())) - under_load.get("survived", 0))
    leaks = [found for found in report.get("redis", {}).values() if not found["leak_free"]]
    late = report.get("cancellation", {})
    late = late.get("requests", 0) - late.get("within_bound", 0)
    rolling = report.get("rolling_update", {})  # a stream truncated or changed by a rolling update, an unclean exit
    lost += rolling.get("truncated", 0) + rolling.get("differing", 0) + rolling.get("unclean_exits", 0)
    return 0 if lost == report["server_crashes"] == late == 0 and not leaks else 1


def cmd_bench_fuzz(args) -> int:
    from specfleet.bench.fuzz import format_table, run

    try:
        report = run(args.models, args.output, count=args.count, seed=args.seed, workers=args.workers)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
    print(format_table(report))
    print(f"\nwrote the \"fuzz\" key of {args.output}")
    ok = not report["wrong_answers"] and not report["server_crashes"] and report["valid_request_after"]
    return 0 if ok else 1


def cmd_bench_gpu(args) -> int:
    from specfleet.bench.gpu import no_cuda_reason, run

    reason = no_cuda_reason()
    if reason:  # at once: nothing here can run without the GPU
        print(f"error: {reason}", file=sys.stderr)
        return 2
    try:
        report = run(args.models, args.output, REPO_ROOT, args.max_new_tokens, args.limit, tuple(args.batches),
                     args.device)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    print(f"\n{'ok' if report['ok'] else 'FAILED'}: CUDA tests {report['tests']['summary']}; engine table "
          f"{'written' if 'error' not in report['engine'] else report['engine']['error']}; greedy rows identical to "
          f"the reference: {report['greedy_identical']}; {report['seconds']} s; wrote {args.output}")
    return 0 if report["ok"] else 1


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
    b.add_argument("--systems", default=None,
                   help="comma-separated rows to run, e.g. specfleet-fused,specfleet-head (hf-greedy, hf-sample and "
                        "specfleet-none always run: the ratios and the lossless check need them); default: all")
    b.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights, activations and KV cache (auto: float32 on the CPU, the checkpoint's own on CUDA)")
    device_option(b)
    b.add_argument("--output", type=Path, default=DEFAULT_BENCH / "engine.json", help="JSON result (+ .png)")
    b.set_defaults(func=cmd_bench_engine)
    b = bsub.add_parser("gpu", formatter_class=fmt,
                        help="`make gpu-check`: the CUDA tests and the engine table on a GPU (exits 2 without one)",
                        description="On a machine with a CUDA device, within about 8 minutes: the CUDA/Triton kernel "
                                    "tests, the engine on the device (bfloat16 greedy parity with Hugging Face "
                                    "generate on CUDA for every supported family; the bundled models greedy and "
                                    "sampled for every proposer), and the engine table -- speculative (fused) vs "
                                    "plain decoding at batch 1, 8 and 32, greedy and sampled, with --device. Without "
                                    "a CUDA device it stops at once with exit status 2. Needs a checkout (tests/).")
    b.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of bundled models")
    b.add_argument("--device", default="cuda", help="the CUDA device to check (cuda or cuda:N)")
    b.add_argument("--limit", type=positive_int, default=16, help="prompts of the batch-1 rows")
    b.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens per prompt")
    b.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8, 32], help="batch sizes of the table")
    b.add_argument("--output", type=Path, default=DEFAULT_BENCH / "gpu.json",
                   help="JSON result (the engine table's own JSON and plot beside it, *-engine.json/.png)")
    b.set_defaults(func=cmd_bench_gpu)
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
                                    "service's memory before and after; Redis keys by kind and verify-stream entries "
                                    "counted after the faults and the load; cancelled streams timed. With "
                                    "--under-load, each fault again in the middle of --streams concurrent requests "
                                    "(greedy and seeded sampled mixed), every output compared with a fault-free run "
                                    "and every request held to its --deadline + 5 s. Exits 1 when a request was lost "
                                    "(or, under load, differed or ended late), a server crashed, Redis kept an orphan "
                                    "or a pending entry, or cancelled work ran on past 2 s.")
    fleet_bench_options(b)
    b.add_argument("--streams", type=positive_int, default=200,
                   help="concurrent streams in the load run and in the faults under load")
    b.add_argument("--seconds", type=float, default=60.0, help="how long the load run sends new requests")
    b.add_argument("--load-tokens", type=positive_int, default=16,
                   help="tokens per request in the load run and in the faults under load")
    b.add_argument("--stages", default="faults,bad-input,cancel,load",
                   help="comma-separated: faults (each fault mid-stream, then Redis counted), bad-input (the fixed "
                        "bad-input corpus; `bench fuzz` is the volume run), cancel (long streams whose clients go "
                        "away: when their work stopped), load (--streams for --seconds with RSS, then Redis counted), "
                        "faults-under-load (as --under-load), rolling (two routers; each service in turn sent "
                        "SIGTERM and replaced under --rolling-streams long streams: truncated and differing outputs "
                        "counted). Keys of stages not run stay in --output as they were")
    b.add_argument("--under-load", action="store_true",
                   help="add the stage faults-under-load: --streams requests at once (greedy and sampled at T=0.8, "
                        "top-p 0.95 with seeds of their own, in turn), a fault-free run, then one run per "
                        "fault injected once the streams hold half the fault-free run's tokens (the faulted service "
                        "restored --outage-s later); outputs vs the fault-free run, each request's end vs its "
                        "deadline + 5 s; then Redis counted. Alone: --stages faults-under-load")
    b.add_argument("--deadline", type=float, default=300.0,
                   help="faults under load: each request's deadline, seconds (the SDK's deadline per attempt; the "
                        "request must end, with its tokens or a typed retryable error, within it + 5 s)")
    b.add_argument("--outage-s", type=float, default=5.0,
                   help="faults under load: seconds from a fault to the restart (or SIGCONT) of the faulted service")
    b.add_argument("--rolling-streams", type=positive_int, default=16,
                   help="rolling stage: concurrent streams (greedy and seeded sampled in turn) per service replaced")
    b.add_argument("--rolling-tokens", type=positive_int, default=256,
                   help="rolling stage: tokens per stream (long enough to outlast 3x the services' 5 s grace)")
    b.add_argument("--output", type=Path, default=DEFAULT_BENCH / "reliability.json", help="JSON result")
    b.set_defaults(func=cmd_bench_reliability)
    b = bsub.add_parser("fuzz", formatter_class=fmt, help="10,000 malformed or extreme inputs against the fleet's "
                                                         "gRPC and HTTP APIs: every answer a result or a typed error",
                        description="Starts the fleet as one process per service (a suffix drafter, one verifier, "
                                    "the router with its HTTP front) on a redis-server of its own, sends --count "
                                    "generated inputs from --seed (gRPC: protobuf field mutations, out-of-range "
                                    "numbers, huge repeated fields, unicode, damaged bytes; HTTP: /v1/completions, "
                                    "/v1/chat/completions and /v1/models with wrong types, huge numbers, unicode, "
                                    "missing fields, broken JSON) and classifies every answer: a result or "
                                    "INVALID_ARGUMENT / HTTP 4xx with a message is right; UNKNOWN, INTERNAL, a 5xx, "
                                    "an error without a message or no answer within 60 s is wrong. Then checks that "
                                    "no process crashed and a normal request is served. Writes the \"fuzz\" key of "
                                    "--output (other keys kept). Exits 1 on any wrong answer or crash.")
    b.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of bundled models")
    b.add_argument("--count", type=positive_int, default=10_000, help="inputs to send")
    b.add_argument("--seed", type=int, default=0, help="seed of the generated inputs (a wrong one replays by index)")
    b.add_argument("--workers", type=positive_int, default=8, help="inputs in flight at a time")
    b.add_argument("--output", type=Path, default=DEFAULT_BENCH / "reliability.json",
                   help="JSON file whose \"fuzz\" key gets the result")
    b.set_defaults(func=cmd_bench_fuzz)

    b = bsub.add_parser("autoscale", formatter_class=fmt,
                        help="a burst and a load ramp on `specfleet up --autoscale`: replicas over time, time "
                             "from the burst to the scale-up decision, reversals, queue wait, nothing lost",
                        description="Starts the local fleet with the operator's autoscaling loop; first holds a "
                                    "low base load, jumps to many times as many clients and back (the burst), then "
                                    "ramps concurrent clients up and down; samples replicas per role from Redis "
                                    "heartbeats, reports the time from the burst's start to the first scale-up "
                                    "decision, direction reversals per role and the verifier queue wait against its "
                                    "target, and checks that no "
                                    "request is lost and every output equals the target's greedy decoding.")
    fleet_bench_options(b)
    b.add_argument("--ramp", default="1,4,12,12,4,1,0,0", help="concurrent clients in each phase")
    b.add_argument("--phase-s", type=float, default=20.0, help="seconds per phase of the ramp")
    b.add_argument("--stages", default="burst,ramp",
                   help="what to run, in order: burst, ramp (the burst first meets a fresh fleet at its minimum)")
    b.add_argument("--burst", default="1,12", help="BASE,PEAK: clients of the base load and of the burst")
    b.add_argument("--burst-s", default="20,30,20",
                   help="BASE,PEAK,AFTER: seconds of base load before the burst (at least: see --settle-s), of the "
                        "burst, and of base load after it")
    b.add_argument("--settle-s", type=float, default=60.0,
                   help="before the burst, up to this much more base load while the verifiers settle at one")
    b.add_argument("--max-new-tokens", type=positive_int, default=24, help="tokens per request")
    b.add_argument("--pools", default="suffix", help="drafter pools")
    b.add_argument("--max-verifiers", type=positive_int, default=3, help="most verifier processes")
    b.add_argument("--interval", type=float, default=1.0, help="seconds between autoscaling steps")
    b.add_argument("--output", type=Path, default=DEFAULT_BENCH / "autoscale.json", help="JSON result (+ .png)")
    b.set_defaults(func=cmd_bench_autoscale)
