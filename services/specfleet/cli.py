"""The `specfleet` command: generation, the demo, training the bundled models, and measuring them."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from specfleet.demo import DEMO_PROMPTS
from specfleet.training.family import DRAFTER_NAMES

REPO_ROOT = Path(__file__).resolve().parents[2]
# Defaults point into the checkout (an editable install); SPECFLEET_MODELS / SPECFLEET_DATA override them.
DEFAULT_MODELS = Path(os.environ.get("SPECFLEET_MODELS", REPO_ROOT / "models"))
DEFAULT_DATA = Path(os.environ.get("SPECFLEET_DATA", REPO_ROOT / "data"))
DEFAULT_BENCH = REPO_ROOT / "bench"


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _model_dir(path: Path) -> Path:
    if not (path / "config.json").exists():
        sys.exit(f"error: no model at {path} (expected a Hugging Face folder with config.json); "
                 "the bundled ones are in models/, or rebuild them with `make models`")
    return path


# ---------------------------------------------------------------- generate / demo

def _engine(args, batch_size: int):
    """(engine, tokenizer) from the generate/demo/bench options; exits with a clear message on bad input."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from specfleet.engine.factory import build_engine, parse_drafters

    hf_logging.disable_progress_bar()  # the per-tensor loading bar would interleave with streamed text
    try:
        drafters = parse_drafters(args.drafters, args.proposer)
        engine = build_engine(args.models, args.proposer, drafters, batch_size=batch_size, k=args.k,
                              adaptive=args.adaptive)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    return engine, AutoTokenizer.from_pretrained(str(args.models / "target"))


def _sampling(args):
    from specfleet.engine.sampling import SamplingParams

    return SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)


def cmd_generate(args) -> int:
    from specfleet.generation import InputError, run_jsonl, stream_prompt

    if (args.prompt is None) == (args.input is None):
        sys.exit("error: give either --prompt TEXT (streams to the terminal) or --input FILE.jsonl with --output")
    if args.input is not None and args.output is None:
        sys.exit("error: --input needs --output FILE.jsonl for the results")
    if args.input is not None:
        from specfleet.generation import read_jsonl

        try:
            read_jsonl(args.input)  # fail on a bad file before loading any model
        except InputError as exc:
            sys.exit(f"error: {exc}")
    engine, tok = _engine(args, args.batch_size if args.input else 1)
    try:
        if args.prompt is not None:
            if not args.prompt:
                sys.exit("error: the prompt is empty; give some text to continue")
            start = time.perf_counter()
            result = stream_prompt(engine, tok, args.prompt, args.max_new_tokens, _sampling(args))
            seconds = time.perf_counter() - start
            n = len(result.token_ids)
            print(f"[{n} tokens in {seconds:.2f}s, {n / seconds:.1f} tok/s, "
                  f"{result.stats['accepted_per_round']:.2f} drafted tokens accepted per round]", file=sys.stderr)
        else:
            summary = run_jsonl(engine, tok, args.input, args.output, args.max_new_tokens, _sampling(args),
                                progress=not args.quiet)
            print(f"wrote {summary['requests']} results to {args.output}: {summary['tokens']} tokens in "
                  f"{summary['seconds']:.1f}s ({summary['tokens'] / summary['seconds']:.1f} tok/s), "
                  f"{summary['accepted_per_round']:.2f} drafted tokens accepted per round", file=sys.stderr)
    except (InputError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    return 0


def cmd_demo(args) -> int:
    if not args.engine:
        from specfleet.demo import run_fleet_demo

        try:
            return run_fleet_demo(args)
        except (RuntimeError, TimeoutError) as exc:
            sys.exit(f"error: {exc}")
    from specfleet.generation import stream_prompt

    engine, tok = _engine(args, 1)
    drafters = ", ".join(getattr(engine.proposer, "drafters", {})) or "none"
    print(f"specfleet demo: speculative decoding with the bundled target; proposer {args.proposer}, drafters "
          f"{drafters}. The output equals the target's own decoding.\n")
    for prompt in DEMO_PROMPTS:
        print("=" * 72)
        print(prompt, end="", flush=True)
        start = time.perf_counter()
        result = stream_prompt(engine, tok, prompt, args.max_new_tokens, _sampling(args))
        seconds = time.perf_counter() - start
        n = len(result.token_ids)
        print(f"[{n} tokens in {seconds:.2f}s, {n / seconds:.0f} tok/s, {result.stats['rounds']} target forward "
              f"passes, {result.stats['accepted_per_round']:.2f} drafted tokens accepted per round]\n")
    return 0


# ---------------------------------------------------------------- train

def cmd_train(args) -> int:
    data, models = args.data_dir, args.models
    stages = ["corpus", "tokenizer", "target", "drafters", "card"] if args.stage == "all" else [args.stage]
    for stage in stages:
        print(f"== train {stage}", flush=True)
        if stage == "corpus" and (data / "corpus" / "manifest.json").exists() and not args.force:
            print(f"corpus exists in {data / 'corpus'}; skipping (--force rebuilds it)")
        elif stage == "tokenizer" and (data / "tokens" / "c.val.bin").exists() and not args.force:
            # A new tokenizer would make the target checkpoint being resumed meaningless.
            print(f"tokenizer and token files exist in {data}; skipping (--force retrains them)")
        elif stage == "corpus":
            from specfleet.training.corpus import build_corpus

            stats = build_corpus(data / "corpus", max_mb_per_domain=args.max_mb_per_domain)
            print(f"documents per domain: {stats.documents}; duplicates dropped {stats.duplicates_dropped}; "
                  f"held-out files skipped {stats.held_out_skipped}")
        elif stage == "tokenizer":
            from specfleet.training.tokenizer import load_tokenizer, tokenize_corpus, train_tokenizer

            bundled = models / "target" / "tokenizer.json"
            if bundled.exists() and not args.force:
                # One tokenizer for the whole family: keep the bundled one so bundled weights stay usable.
                tok = load_tokenizer(bundled.parent)
                tok.save_pretrained(data / "tokenizer")
                print(f"using the bundled tokenizer from {bundled.parent} (--force trains a new one)")
            else:
                tok = train_tokenizer(data / "corpus", data / "tokenizer", vocab_size=args.vocab_size)
            print(f"vocabulary: {len(tok)} tokens")
            print(f"token counts: {tokenize_corpus(data / 'corpus', data / 'tokenizer', data / 'tokens')}")
        elif stage == "target":
            from specfleet.training.train import RunConfig, train_target

            cfg = RunConfig(steps=args.target_steps, batch=args.batch, seq=256, lr=args.lr, warmup=60,
                            seed=args.seed, eval_every=100, checkpoint_minutes=4)
            train_target(data / "tokens", data / "tokenizer", models / "target", data / "runs" / "target", cfg,
                         minutes=args.minutes, device_name=args.device)
        elif stage == "drafters":
            from specfleet.training.distill import DistillConfig, distill_all

            distill_all(_model_dir(models / "target"), data / "tokens", data / "runs" / "teacher", models,
                        DistillConfig(seed=args.seed), names=args.drafters, device_name=args.device,
                        steps=args.drafter_steps, windows=args.teacher_windows)
        elif stage == "card":
            from specfleet.training.cards import write_card

            print(f"wrote {write_card(models, DEFAULT_BENCH / 'acceptance.json')}")
    return 0


# ---------------------------------------------------------------- models

def cmd_models_acceptance(args) -> int:
    from specfleet.training.acceptance import AcceptanceConfig, format_table, measure, write_json
    from specfleet.training.cards import write_card

    cfg = AcceptanceConfig(k=args.k, prompts=args.prompts, new_tokens=args.new_tokens)
    names = list(DRAFTER_NAMES) + (["target"] if args.include_target else [])
    result = measure(args.models, args.data_dir / "tokens", cfg, drafters=names)
    write_json(result, args.output)
    print(format_table(result))
    print(f"\nwrote {args.output}")
    if args.update_card:
        print(f"wrote {write_card(args.models, args.output)}")
    return 0


def cmd_models_card(args) -> int:
    from specfleet.training.cards import write_card

    print(f"wrote {write_card(args.models, args.acceptance)}")
    return 0


# ---------------------------------------------------------------- bench

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
        report = run(args.models, args.redis_url, args.max_new_tokens, args.limit, args.output,
                     concurrency=tuple(args.concurrency), stages=stages,
                     ablation_concurrency=args.ablation_concurrency)
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


# ---------------------------------------------------------------- parser

def _engine_options(p: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    from specfleet.engine.factory import PROPOSERS

    p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of bundled models")
    p.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens, help="tokens to generate")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=_probability, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=_non_negative_int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="random seed; equal seeds give equal samples")
    p.add_argument("--proposer", choices=PROPOSERS, default="fused",
                   help="who drafts: fused (several drafter models, CoSine fusion), model (one drafter), suffix "
                        "(suffix trees), ngram (prompt lookup), none (plain decoding, same code path)")
    p.add_argument("--drafters", default=None,
                   help="comma-separated drafter names for model/fused: python, prose, c, general "
                        "(default: general for model, python,prose,c for fused)")
    p.add_argument("--k", type=_positive_int, default=4, help="most draft levels per round")
    p.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                   help="always draft k levels with every drafter (default: adaptive speculation control)")


def cmd_certs(args) -> int:
    from specfleet.security import write_dev_certs

    try:
        files = write_dev_certs(args.dir, [h.strip() for h in args.hosts.split(",") if h.strip()], args.days)
    except (ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")
    for label, path in files.items():
        print(f"{label:>10}: {path}")
    return 0


def cmd_redis_acl(args) -> int:
    from specfleet.security import redis_acl_setuser, redis_password

    try:
        print(redis_acl_setuser(args.user, args.prefix, redis_password(args.password_file)))
    except (ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")
    return 0


def cmd_profile(args) -> int:
    import json

    from specfleet.profile import format_table, run

    drafters = tuple(d.strip() for d in args.drafters.split(",") if d.strip())
    unknown = [d for d in drafters if d not in DRAFTER_NAMES]
    if unknown:
        sys.exit(f"error: unknown drafter(s) {', '.join(unknown)}; choose from {', '.join(DRAFTER_NAMES)}")
    try:
        profile = run(args.models, drafters, args.repeats)
    except FileNotFoundError as exc:
        sys.exit(f"error: {exc}")
    print(format_table(profile))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(profile, indent=1) + "\n")
    print(f"\nwrote {args.output}; use it with `specfleet serve verifier --profile {args.output}`")
    return 0


def _fleet_bench_options(b: argparse.ArgumentParser) -> None:
    """What every benchmark that starts a fleet takes: the models and the Redis it keeps state in."""
    b.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of bundled models")
    b.add_argument("--redis-url", default=os.environ.get("SPECFLEET_REDIS_URL", "redis://127.0.0.1:6379/0"),
                   help="Redis for the fleet's state (keys under a fresh prefix, removed afterwards)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="specfleet",
        description="Lossless collaborative speculative decoding: generate text, train and measure the bundled "
                    "model family.",
        epilog="Quick start: `make demo` (or `specfleet demo`), then `specfleet generate --prompt 'def main():'`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("generate", help="generate with speculative decoding: one prompt streamed, or JSONL in/out",
                       formatter_class=fmt,
                       description="Continue prompts with the bundled target, drafting with the chosen proposer; the "
                                   "output equals the target's own decoding (greedy by default; --temperature > 0 "
                                   "samples from the target's distribution). --prompt streams one continuation; "
                                   "--input reads lines {\"id\": ..., \"prompt\": \"...\"} and --output gets lines "
                                   "{\"id\", \"text\", \"token_ids\", \"finish_reason\", \"stats\"}.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text to continue, streamed to stdout")
    src.add_argument("--input", type=Path, help="JSONL file of prompts")
    p.add_argument("--output", type=Path, help="JSONL file for the results (with --input)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="requests verified together (with --input)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _engine_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="a real generation through the fleet (or the engine) with the bundled models",
                       formatter_class=fmt,
                       description="Starts the fleet with `specfleet up` (router, fusion, drafter pools, verifier, "
                                   "embedded Redis), streams speculative decoding of a few prompts through the SDK, "
                                   "prints a table of rounds and accepted tokens, and stops the fleet. --engine runs "
                                   "the same prompts in this process instead.")
    _engine_options(p, max_new_tokens=48)
    p.add_argument("--engine", action="store_true", help="run in this process (no services, no Redis)")
    p.add_argument("--pools", default="python,prose,c,suffix", help="fleet: drafter pools to start")
    p.add_argument("--redis-url", default=os.environ.get("SPECFLEET_REDIS_URL"),
                   help="fleet: use this Redis instead of an embedded one")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="fleet: seconds to wait for it to start")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="rebuild the bundled models: corpus, tokenizer, target, drafters, card",
                       formatter_class=fmt,
                       description="Rebuild the model family from text on this machine. Stages run in order with "
                                   "`all`; each is resumable (target checkpoints in DATA_DIR/runs/target) and "
                                   "seeded. Runs on CUDA when available, else the CPU (slowly).")
    p.add_argument("stage", choices=["all", "corpus", "tokenizer", "target", "drafters", "card"],
                   help="what to (re)build")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="corpora, tokens and checkpoints")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="where model folders are written")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--force", action="store_true",
                   help="rebuild the corpus and tokenizer even when they exist (then delete data/runs/ too)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    p.add_argument("--max-mb-per-domain", type=float, default=30.0, help="corpus cap per domain (MB of text)")
    p.add_argument("--vocab-size", type=_positive_int, default=8192, help="BPE vocabulary size")
    p.add_argument("--target-steps", type=_positive_int, default=1000,
                   help="target optimiser steps (sets the LR schedule; training resumes up to it)")
    p.add_argument("--batch", type=_positive_int, default=8, help="target sequences per step (256 tokens each)")
    p.add_argument("--lr", type=float, default=1.5e-3, help="target peak learning rate")
    p.add_argument("--minutes", type=float, default=None, help="stop target training after this long (resumable)")
    p.add_argument("--drafter-steps", type=_positive_int, default=None,
                   help="distillation steps per drafter (default: each drafter's recipe in training/distill.py)")
    p.add_argument("--teacher-windows", type=_positive_int, default=None,
                   help="256-token windows per domain in the target's teacher cache (default: the recipe's)")
    p.add_argument("--drafters", nargs="+", default=None, choices=DRAFTER_NAMES,
                   help="only these drafters (default: all four)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="benchmarks that print and write JSON (ratios measured side by side)")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    b = bsub.add_parser("engine", formatter_class=fmt,
                        help="tokens/s of HF generate / assisted / prompt lookup vs specfleet's proposers",
                        description="Measures, in one run on the same held-out prompts: hf-greedy, hf-assisted "
                                    "(the prompt's domain drafter), hf-prompt-lookup, specfleet-none/model/suffix/"
                                    "fused at batch 1, greedy and sampled (T=0.8, top-p 0.95), and a batch sweep "
                                    "of specfleet-fused against plain batched decoding. Writes JSON and a PNG plot.")
    b.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of bundled models")
    b.add_argument("--prompts", type=Path, default=None,
                   help="JSONL with \"prompt\" (and \"domain\") per line (default: the held-out set in "
                        "specfleet/bench/prompts.py)")
    b.add_argument("--limit", type=_positive_int, default=24, help="prompts used (round-robin over domains)")
    b.add_argument("--max-new-tokens", type=_positive_int, default=128, help="tokens per prompt")
    b.add_argument("--batches", type=_positive_int, nargs="+", default=[1, 4, 16], help="batch sweep")
    b.add_argument("--output", type=Path, default=DEFAULT_BENCH / "engine.json", help="JSON result (+ .png)")
    b.set_defaults(func=cmd_bench_engine)
    b = bsub.add_parser("fleet", formatter_class=fmt,
                        help="the fleet's per-round overhead and throughput vs the engine",
                        description="Plain decoding through the in-process engine and through the fleet (gRPC + "
                                    "Redis) for the per-round overhead (p50/p99), then throughput at each "
                                    "concurrency, fleet vs engine, same models and held-out prompts.")
    _fleet_bench_options(b)
    b.add_argument("--limit", type=_positive_int, default=12, help="prompts")
    b.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens per prompt")
    b.add_argument("--concurrency", type=_positive_int, nargs="+", default=[1, 8, 32], help="concurrent streams")
    b.add_argument("--stages", default="overhead,throughput,ablation,dsi",
                   help="comma-separated: overhead (per-round gRPC + Redis cost), throughput (fleet vs engine), "
                        "ablation (each CoSine switch off in turn, greedy and sampled), dsi (two verifiers with "
                        "speculation parallelism on and off, stream and gRPC verify queues, at concurrency 1 and 8)")
    b.add_argument("--ablation-concurrency", type=_positive_int, default=8, help="streams at a time in the ablation")
    b.add_argument("--output", type=Path, default=DEFAULT_BENCH / "fleet.json", help="JSON result")
    b.set_defaults(func=cmd_bench_fleet)
    b = bsub.add_parser("reliability", formatter_class=fmt, help="faults, bad input and load against the fleet",
                        description="The fleet as one process per service: kill -9 of a drafter, fusion, a verifier "
                                    "and the router, SIGSTOP of a verifier and a restart of the fleet's own persistent "
                                    "Redis mid-stream (outputs vs the unfaulted run), a fuzz of the gRPC and HTTP "
                                    "APIs, then a bounded load run with each "
                                    "service's memory before and after. Exits 1 when a request was lost or a server "
                                    "crashed.")
    _fleet_bench_options(b)
    b.add_argument("--streams", type=_positive_int, default=200, help="concurrent streams in the load run")
    b.add_argument("--seconds", type=float, default=60.0, help="how long the load run sends new requests")
    b.add_argument("--output", type=Path, default=DEFAULT_BENCH / "reliability.json", help="JSON result")
    b.set_defaults(func=cmd_bench_reliability)

    b = bsub.add_parser("autoscale", formatter_class=fmt,
                        help="a load ramp up and down on `specfleet up --autoscale`: replicas over time, nothing lost",
                        description="Starts the local fleet with the operator's autoscaling loop, ramps concurrent "
                                    "clients up and down, samples replicas per role from Redis heartbeats, and checks "
                                    "that no request is lost and every output equals the target's greedy decoding.")
    _fleet_bench_options(b)
    b.add_argument("--ramp", default="1,4,12,12,4,1,0,0", help="concurrent clients in each phase")
    b.add_argument("--phase-s", type=float, default=20.0, help="seconds per phase")
    b.add_argument("--max-new-tokens", type=_positive_int, default=24, help="tokens per request")
    b.add_argument("--pools", default="suffix", help="drafter pools")
    b.add_argument("--max-verifiers", type=_positive_int, default=3, help="most verifier processes")
    b.add_argument("--interval", type=float, default=1.0, help="seconds between autoscaling steps")
    b.add_argument("--output", type=Path, default=DEFAULT_BENCH / "autoscale.json", help="JSON result (+ .png)")
    b.set_defaults(func=cmd_bench_autoscale)

    p = sub.add_parser("profile", formatter_class=fmt, help="time the target and drafters on this machine",
                       description="Times the target's forward over batch sizes x tokens per sequence and each "
                                   "drafter's step, fits the verifier's cost model (fixed + per-token ms) and writes "
                                   "JSON; `serve verifier --profile FILE` caps each batched forward by it.")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of bundled models")
    p.add_argument("--drafters", default=",".join(DRAFTER_NAMES), help="drafters to time")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed forwards per shape (the median is kept)")
    p.add_argument("--output", type=Path, default=DEFAULT_BENCH / "profile.json", help="JSON result")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("certs", formatter_class=fmt, help="write a development CA and loopback TLS certificates",
                       description="Writes a throwaway CA (ca.pem) and a server (server.pem, server-key.pem) and "
                                   "client (client.pem, client-key.pem) certificate signed by it, for TLS / mTLS "
                                   "between fleet services on this machine; the CA's key is not kept. Development "
                                   "only: in a cluster use cert-manager or your own PKI. Needs the cryptography "
                                   "package.",
                       epilog="then: specfleet serve verifier --tls-cert DIR/server.pem --tls-key DIR/server-key.pem "
                              "--tls-client-ca DIR/ca.pem ...; specfleet serve router --internal-tls-ca DIR/ca.pem "
                              "--internal-tls-cert DIR/client.pem --internal-tls-key DIR/client-key.pem ...")
    p.add_argument("dir", type=Path, help="folder to write the PEM files into (created if missing)")
    p.add_argument("--hosts", default="127.0.0.1,localhost,::1",
                   help="comma-separated IPs / DNS names the server certificate is valid for")
    p.add_argument("--days", type=_positive_int, default=30, help="validity in days")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("redis-acl", formatter_class=fmt, help="print a least-privilege Redis ACL user for one fleet",
                       description="Prints `ACL SETUSER NAME ...` granting only the commands the state store uses "
                                   "on keys PREFIX:* (no FLUSHALL, CONFIG, KEYS, ACL, no pub/sub channels); the "
                                   "password is given as its SHA-256, so the line holds no secret. Run it with "
                                   "redis-cli, or put it (without 'ACL SETUSER', as `user NAME ...`) in an ACL file; "
                                   "see docs/redis.md.",
                       epilog="then: SPECFLEET_REDIS_URL=redis://NAME:$(cat PASSWORD_FILE)@HOST:6379/0")
    p.add_argument("--user", required=True, help="the Redis user name")
    p.add_argument("--prefix", default="sf", help="the fleet's key prefix (--key-prefix of its services)")
    p.add_argument("--password-file", type=Path, required=True,
                   help="the user's password; a new random one is written there (mode 0600) if the file is missing")
    p.set_defaults(func=cmd_redis_acl)

    from specfleet.fleet_cli import add_parsers as add_fleet_parsers
    from specfleet.sdk.cli import add_client_parser
    from specfleet_operator.cli import add_parsers as add_operator_parsers
    from specfleet_operator.simulator.cli import add_parsers as add_simulate_parsers

    add_fleet_parsers(sub, fmt, DEFAULT_MODELS)
    add_operator_parsers(sub, fmt)
    add_simulate_parsers(sub, fmt)
    add_client_parser(sub)

    p = sub.add_parser("models", help="measure the bundled models and regenerate their model card")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    a = msub.add_parser("acceptance", formatter_class=fmt,
                        help="measure the drafter x domain acceptance matrix (greedy, k draft tokens)",
                        description="Mean tokens per round of greedy speculative decoding for every drafter on "
                                    "every domain's validation text, against the target.")
    a.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of bundled models")
    a.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="holds tokens/ from `specfleet train`")
    a.add_argument("--k", type=_positive_int, default=4, help="draft tokens per round")
    a.add_argument("--prompts", type=_positive_int, default=48, help="validation prompts per domain")
    a.add_argument("--new-tokens", type=_positive_int, default=96, help="tokens generated per prompt")
    a.add_argument("--include-target", action="store_true", help="also measure the target as its own drafter "
                   "(a sanity row: must be k + 1)")
    a.add_argument("--output", type=Path, default=DEFAULT_BENCH / "acceptance.json", help="JSON result")
    a.add_argument("--no-update-card", dest="update_card", action="store_false",
                   help="do not rewrite models/README.md")
    a.set_defaults(func=cmd_models_acceptance)
    c = msub.add_parser("card", formatter_class=fmt, help="regenerate models/README.md from the model folders")
    c.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of bundled models")
    c.add_argument("--acceptance", type=Path, default=DEFAULT_BENCH / "acceptance.json",
                   help="acceptance JSON to include")
    c.set_defaults(func=cmd_models_card)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
