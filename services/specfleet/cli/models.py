"""`specfleet models acceptance|card`: measure the bundled models and regenerate their model card."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from specfleet.cli.options import (
    DEFAULT_BENCH,
    DEFAULT_DATA,
    DEFAULT_MODELS,
    non_negative_float,
    positive_int,
    probability,
)
from specfleet.training.family import DRAFTER_NAMES


def _models_folder(path: Path) -> Path:
    if not (path / "target" / "config.json").exists():
        sys.exit(f"error: no model family at {path} (expected target/ and drafter-*/ Hugging Face folders, as in "
                 "the bundled models/)")
    return path


def cmd_models_acceptance(args) -> int:
    from specfleet.training.acceptance import AcceptanceConfig, Warps, format_table, measure, write_json
    from specfleet.training.cards import write_card

    cfg = AcceptanceConfig(k=args.k, prompts=args.prompts, new_tokens=args.new_tokens,
                           sampled={"temperature": args.temperature, "top_p": args.top_p})
    _models_folder(args.models)
    if not (args.data_dir / "tokens" / "python.val.bin").exists():
        sys.exit(f"error: no validation tokens in {args.data_dir / 'tokens'}: build them with "
                 f"`specfleet train corpus --data-dir {args.data_dir}` then `specfleet train tokenizer`")
    names = list(DRAFTER_NAMES) + (["target"] if args.include_target else [])
    warps = None
    if args.temperature > 0:
        from specfleet.engine.sampling import SamplingParams, draft_probs, warp_probs
        from specfleet_kernels.reference import position_keyed_sample

        params = SamplingParams(temperature=args.temperature, top_p=args.top_p)
        warps = Warps(target_probs=lambda logits: warp_probs(logits, params),
                      draft_probs=lambda logits: draft_probs(logits, params), sample=position_keyed_sample)
    head = _head_drafter(args.models, args.temperature, args.top_p)
    result = measure(args.models, args.data_dir / "tokens", cfg, drafters=names, warps=warps,
                     heads={"head": head} if head is not None else None)
    write_json(result, args.output)
    print("greedy: tokens per round\n" + format_table(result))
    if warps is not None:
        print(f"\nsampled (T {args.temperature}, top-p {args.top_p}): tokens per round (α = mean sum min(p, q))\n"
              + format_table(result, sampled=True))
    print(f"\nwrote {args.output}")
    if args.update_card:
        print(f"wrote {write_card(args.models, args.output)}")
    return 0


def _head_drafter(models_dir: Path, temperature: float, top_p: float, head_dir: Path | None = None):
    """The bundled draft head (or the one in head_dir) as the engine runs it (a chain, no siblings: comparable with
    the drafters' rows), or None when the models folder has none."""
    from specfleet.engine.models import ModelSet

    models = ModelSet.bundled(models_dir)
    if head_dir is not None:
        models = models.with_overrides(head=head_dir)
    if models.head is None:
        return None
    from specfleet.engine.head import HeadModel, HeadProposer
    from specfleet.engine.proposers import Draft
    from specfleet.engine.sampling import SamplingParams
    from specfleet.training.train import load_model

    target = load_model(models.target)
    proposer = HeadProposer(HeadModel(models.head, target, slots=64, target_dir=models.target), siblings=False)
    params = SamplingParams(temperature=temperature, top_p=top_p) if temperature > 0 else None

    class Drafter:
        def __call__(self, rids, contexts, features, k, seeds, positions):
            batch = [Draft(rid, context, k, None, None if seeds is None else params,
                           None if seeds is None else seeds[i], positions[i], features=features[i])
                     for i, (rid, context) in enumerate(zip(rids, contexts, strict=True))]
            return [tree.tokens.tolist() for tree in proposer.propose(batch)]

        def release(self, rids):
            for rid in rids:
                proposer.stop(rid, [])

    return Drafter()


def _vocab_sizes(text: str) -> list[int]:
    import argparse

    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(n < 2 for n in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated whole numbers >= 2, e.g. 4096,2048")
    return sizes


def cmd_models_head_vocab(args) -> int:
    """The draft head with draft vocabularies of several sizes, side by side in one run: the share of validation
    tokens inside each, simulated accepted tokens per round (greedy and sampled) and a draft level's cost against
    a target step at batch 1."""
    import tempfile

    from specfleet.engine.factory import build_head, load_model
    from specfleet.engine.llama import LlamaRunner
    from specfleet.engine.models import ModelSet
    from specfleet.engine.sampling import SamplingParams, draft_probs, warp_probs
    from specfleet.training.acceptance import AcceptanceConfig, Warps, measure, write_json
    from specfleet.training.head import copy_with_draft_vocab, draft_vocabulary, vocabulary_coverage
    from specfleet_kernels.reference import position_keyed_sample

    models = ModelSet.bundled(_models_folder(args.models))
    tokens = args.data_dir / "tokens"
    if models.head is None:
        sys.exit(f"error: no draft head in {args.models}: train one with `specfleet train head`")
    if not (tokens / "python.val.bin").exists():
        sys.exit(f"error: no tokens in {tokens}: build them with `specfleet train corpus --data-dir "
                 f"{args.data_dir}` then `specfleet train tokenizer`")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    warps = Warps(target_probs=lambda logits: warp_probs(logits, params),
                  draft_probs=lambda logits: draft_probs(logits, params), sample=position_keyed_sample)
    cfg = AcceptanceConfig(k=args.k, prompts=args.prompts, new_tokens=args.new_tokens,
                           sampled={"temperature": args.temperature, "top_p": args.top_p})
    target = load_model(models, "target")
    if max(args.sizes) >= target.config.vocab_size:
        sys.exit(f"error: --sizes must stay below the target's vocabulary of {target.config.vocab_size} tokens")
    eos = target.config.eos_token_id
    plain = LlamaRunner(target, slots=1)
    rows, vocabs, dirs, drafters = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in [0, *args.sizes]:
            name = str(size or "full")
            vocabs[name] = draft_vocabulary(tokens, size, () if eos is None else (int(eos),)) if size else None
            dirs[name] = copy_with_draft_vocab(models.head, Path(tmp) / f"head-{size}", vocabs[name])
            drafters[name] = _head_drafter(args.models, args.temperature, args.top_p, dirs[name])
        # one measurement: every size drafts against the same target continuations, computed once
        matrix = measure(args.models, tokens, cfg, drafters=(), warps=warps, heads=drafters)["matrix"]
        for name, head_dir in dirs.items():
            head = build_head(models.with_overrides(head=head_dir), 1, target=target).runner
            steps = [(head.time_forward(1, 1, 1), plain.time_forward(1, 1, 1)) for _ in range(args.repeats)]
            cells = matrix[name]
            rows[name] = {
                "coverage": vocabulary_coverage(tokens, vocabs[name]) if vocabs[name] is not None else None,
                "greedy_tokens_per_round": {d: cell["tokens_per_round"] for d, cell in cells.items()},
                "sampled_tokens_per_round": {d: cell["sampled"]["tokens_per_round"] for d, cell in cells.items()},
                "step_ms": round(1e3 * min(h for h, _ in steps), 3),
                "step_vs_target": round(min(h for h, _ in steps) / min(t for _, t in steps), 4)}
            print(f"{name:>6}: {json.dumps(rows[name])}", flush=True)
    write_json({"config": {**cfg.__dict__, "sizes": args.sizes}, "rows": rows}, args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_models_card(args) -> int:
    from specfleet.training.cards import write_card

    print(f"wrote {write_card(_models_folder(args.models), args.acceptance)}")
    return 0



def add_parser(sub, fmt) -> None:
    p = sub.add_parser("models", help="measure the bundled models and regenerate their model card")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    a = msub.add_parser("acceptance", formatter_class=fmt,
                        help="measure the drafter x domain acceptance matrix (greedy and sampled, k draft tokens)",
                        description="Mean tokens per round of speculative decoding for every drafter on every "
                                    "domain's validation text, against the target: greedy, and sampled with "
                                    "stochastic drafts coupled to the target's sample as the engine does (with the "
                                    "acceptance rate, mean sum min(p, q), beside it).")
    a.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of bundled models")
    a.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="holds tokens/ from `specfleet train`")
    a.add_argument("--k", type=positive_int, default=4, help="draft tokens per round")
    a.add_argument("--prompts", type=positive_int, default=48, help="validation prompts per domain")
    a.add_argument("--new-tokens", type=positive_int, default=96, help="tokens generated per prompt")
    a.add_argument("--temperature", type=non_negative_float, default=0.8,
                   help="temperature of the sampled columns (0 measures greedy only)")
    a.add_argument("--top-p", type=probability, default=0.95, help="top-p of the sampled columns")
    a.add_argument("--include-target", action="store_true", help="also measure the target as its own drafter "
                   "(a sanity row: must be k + 1)")
    a.add_argument("--output", type=Path, default=DEFAULT_BENCH / "acceptance.json", help="JSON result")
    a.add_argument("--no-update-card", dest="update_card", action="store_false",
                   help="do not rewrite models/README.md")
    a.set_defaults(func=cmd_models_acceptance)
    v = msub.add_parser("head-vocab", formatter_class=fmt,
                        help="compare draft vocabulary sizes for the draft head (acceptance and step cost)",
                        description="The bundled draft head with draft vocabularies of the given sizes (the most "
                                    "frequent training tokens) beside the full vocabulary, in one run: validation "
                                    "coverage, simulated tokens per round greedy and sampled, and a draft level's "
                                    "cost against a target step at batch 1. Pick a size for `specfleet train head "
                                    "--draft-vocab N`.")
    v.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of bundled models")
    v.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="holds tokens/ from `specfleet train`")
    v.add_argument("--sizes", type=_vocab_sizes, default=[4096, 3072, 2048],
                   help="comma-separated draft vocabulary sizes (each >= 2 and below the target's vocabulary)")
    v.add_argument("--k", type=positive_int, default=4, help="draft tokens per round")
    v.add_argument("--prompts", type=positive_int, default=24, help="validation prompts per domain")
    v.add_argument("--new-tokens", type=positive_int, default=96, help="tokens generated per prompt")
    v.add_argument("--temperature", type=non_negative_float, default=0.8, help="temperature of the sampled columns")
    v.add_argument("--top-p", type=probability, default=0.95, help="top-p of the sampled columns")
    v.add_argument("--repeats", type=positive_int, default=30, help="timed steps (the fastest counts)")
    v.add_argument("--output", type=Path, default=DEFAULT_BENCH / "head-vocab.json", help="JSON result")
    v.set_defaults(func=cmd_models_head_vocab)
    c = msub.add_parser("card", formatter_class=fmt, help="regenerate models/README.md from the model folders")
    c.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of bundled models")
    c.add_argument("--acceptance", type=Path, default=DEFAULT_BENCH / "acceptance.json",
                   help="acceptance JSON to include")
    c.set_defaults(func=cmd_models_card)
