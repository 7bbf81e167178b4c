"""`specfleet demo`: a real generation through the fleet (`specfleet up` with the bundled models), or through the
engine in this process with --engine."""

from __future__ import annotations

import os
import sys
import time

from specfleet.cli.generate import stream_prompt
from specfleet.cli.options import engine_from_args, engine_options, sampling_from_args
from specfleet.local.demo import DEMO_PROMPTS


def cmd_demo(args) -> int:
    if not args.engine:
        from specfleet.local.demo import run_fleet_demo

        try:
            return run_fleet_demo(args)
        except (RuntimeError, TimeoutError, ValueError) as exc:
            sys.exit(f"error: {exc}")
    engine, tok = engine_from_args(args, 1)
    drafters = ", ".join(getattr(engine.proposer, "drafters", {})) or "none"
    print(f"specfleet demo: speculative decoding with the bundled target; proposer {args.proposer}, drafters "
          f"{drafters}. The output equals the target's own decoding.\n")
    for prompt in DEMO_PROMPTS:
        print("=" * 72)
        print(prompt, end="", flush=True)
        start = time.perf_counter()
        result = stream_prompt(engine, tok, prompt, args.max_new_tokens, sampling_from_args(args))
        seconds = time.perf_counter() - start
        n = len(result.token_ids)
        print(f"[{n} tokens in {seconds:.2f}s, {n / seconds:.0f} tok/s, {result.stats['rounds']} target forward "
              f"passes, {result.stats['accepted_per_round']:.2f} drafted tokens accepted per round]\n")
    return 0



def add_parser(sub, fmt) -> None:
    p = sub.add_parser("demo", help="a real generation through the fleet (or the engine) with the bundled models",
                       formatter_class=fmt,
                       description="Starts the fleet with `specfleet up` (router, fusion, drafter pools, verifier, "
                                   "embedded Redis), streams speculative decoding of a few prompts through the SDK, "
                                   "prints a table of rounds and accepted tokens, and stops the fleet. --engine runs "
                                   "the same prompts in this process instead.")
    engine_options(p, max_new_tokens=48)
    p.add_argument("--engine", action="store_true", help="run in this process (no services, no Redis)")
    p.add_argument("--pools", default="python,prose,c,suffix", help="fleet: drafter pools to start")
    p.add_argument("--redis-url", default=os.environ.get("SPECFLEET_REDIS_URL"),
                   help="fleet: use this Redis instead of an embedded one")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="fleet: seconds to wait for it to start")
    p.set_defaults(func=cmd_demo)
