"""`specfleet profile`: time the target and drafters on this machine and fit the verifier's cost model."""

from __future__ import annotations

import sys
from pathlib import Path

from specfleet.cli.options import DEFAULT_BENCH, model_options, model_set_from_args, positive_int


def cmd_profile(args) -> int:
    import json

    from specfleet.engine.profile import format_table, run

    models = model_set_from_args(args)
    known = [f"drafter-{n}" for n in models.drafters]
    given = args.drafters.split(",") if args.drafters is not None else known
    drafters = tuple(f"drafter-{d.strip().removeprefix('drafter-')}" for d in given if d.strip())
    unknown = [d for d in drafters if d not in known]
    if unknown:
        sys.exit(f"error: unknown drafter(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    try:
        profile = run(models, drafters, args.repeats)
    except FileNotFoundError as exc:
        sys.exit(f"error: {exc}")
    print(format_table(profile))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(profile, indent=1) + "\n")
    print(f"\nwrote {args.output}; use it with `specfleet serve verifier --profile {args.output}`")
    return 0



def add_parser(sub, fmt) -> None:
    p = sub.add_parser("profile", formatter_class=fmt, help="time the target and drafters on this machine",
                       description="Times the target's forward over batch sizes x tokens per sequence and each "
                                   "drafter's step, fits the verifier's cost model (fixed + per-token ms) and writes "
                                   "JSON; `serve verifier --profile FILE` caps each batched forward by it.")
    model_options(p)
    p.add_argument("--drafters", default=None, help="comma-separated drafters to time (default: every one)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed forwards per shape (the median is kept)")
    p.add_argument("--output", type=Path, default=DEFAULT_BENCH / "profile.json", help="JSON result")
    p.set_defaults(func=cmd_profile)
