"""`specfleet models acceptance|card`: measure the bundled models and regenerate their model card."""

from __future__ import annotations

from pathlib import Path

from specfleet.cli.options import DEFAULT_BENCH, DEFAULT_DATA, DEFAULT_MODELS, positive_int
from specfleet.training.family import DRAFTER_NAMES


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



def add_parser(sub, fmt) -> None:
    p = sub.add_parser("models", help="measure the bundled models and regenerate their model card")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    a = msub.add_parser("acceptance", formatter_class=fmt,
                        help="measure the drafter x domain acceptance matrix (greedy, k draft tokens)",
                        description="Mean tokens per round of greedy speculative decoding for every drafter on "
                                    "every domain's validation text, against the target.")
    a.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of bundled models")
    a.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="holds tokens/ from `specfleet train`")
    a.add_argument("--k", type=positive_int, default=4, help="draft tokens per round")
    a.add_argument("--prompts", type=positive_int, default=48, help="validation prompts per domain")
    a.add_argument("--new-tokens", type=positive_int, default=96, help="tokens generated per prompt")
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
