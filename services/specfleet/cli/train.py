"""`specfleet train STAGE`: rebuild the bundled models (corpus, tokenizer, target, drafters, card), resumable."""

from __future__ import annotations

from pathlib import Path

from specfleet.cli.options import (
    DEFAULT_BENCH,
    DEFAULT_DATA,
    DEFAULT_MODELS,
    model_dir,
    non_negative_int,
    positive_int,
    probability,
    unit_fraction,
)
from specfleet.training.family import DRAFTER_NAMES

PRECISIONS = ("auto", "fp32", "bf16")  # training.train.PRECISIONS (not imported here: it pulls in torch)


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
                tok.save_pretrained(data / "tokenizer", save_jinja_files=False)
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
                         minutes=args.minutes, device_name=args.device, precision=args.precision)
        elif stage == "drafters":
            from specfleet.training.distill import DistillConfig, distill_all

            generate = None if args.device == "cuda" else _engine_continuations(models / "target")
            distill_all(model_dir(models / "target"), data / "tokens", data / "runs" / "teacher", models,
                        DistillConfig(seed=args.seed, on_policy=args.on_policy, loss=args.distill_loss),
                        names=args.drafters, device_name=args.device,
                        steps=args.drafter_steps, windows=args.teacher_windows, generate=generate,
                        precision=args.precision)
        elif stage == "head":
            from specfleet.training.head import HeadRunConfig, train_head

            cfg = HeadRunConfig(steps=args.head_steps, batch=args.batch, seed=args.seed, passes=args.head_passes,
                                draft_vocab=args.draft_vocab, lr=args.head_lr)
            train_head(data / "tokens", model_dir(models / "target"), models / "head", data / "runs" / "head", cfg,
                       minutes=args.minutes, device_name=args.device, precision=args.precision)
        elif stage == "card":
            from specfleet.training.cards import write_card

            print(f"wrote {write_card(models, DEFAULT_BENCH / 'acceptance.json')}")
    return 0



def _engine_continuations(target_dir: Path, batch: int = 32):
    """The target's own continuations for on-policy distillation, from the engine's batched plain decoding (several
    times faster than Hugging Face's loop on the CPU): (prompts [n, P], new_tokens, temperature, top_p, seed) ->
    [n, new_tokens], temperature 0 greedy, request i sampled with seed + i."""
    import torch

    from specfleet.engine.engine import Request, SpecEngine
    from specfleet.engine.factory import load_model
    from specfleet.engine.models import ModelSet
    from specfleet.engine.proposers import NoProposer
    from specfleet.engine.sampling import SamplingParams

    engine = SpecEngine(load_model(ModelSet(target_dir), "target"), NoProposer(), max_batch=batch)

    def generate(prompts, new_tokens: int, temperature: float, top_p: float, seed: int):
        requests = [Request(f"on-policy-{i}", row.tolist(), new_tokens, ignore_eos=True,
                            params=SamplingParams(temperature, top_p if temperature else 1.0, 0, seed + i))
                    for i, row in enumerate(prompts)]
        return torch.tensor([r.token_ids for r in engine.generate(requests)])

    return generate


def add_parser(sub, fmt) -> None:
    p = sub.add_parser("train", help="rebuild the bundled models: corpus, tokenizer, target, drafters, card",
                       formatter_class=fmt,
                       description="Rebuild the model family from text on this machine. Stages run in order with "
                                   "`all`; each is resumable (target checkpoints in DATA_DIR/runs/target) and "
                                   "seeded. Runs on CUDA when available, else the CPU (slowly).")
    p.add_argument("stage", choices=["all", "corpus", "tokenizer", "target", "drafters", "head", "card"],
                   help="what to (re)build (head: the draft head on the target's features; not part of all)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="corpora, tokens and checkpoints")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="where model folders are written")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="fp32, or bf16 mixed precision (fp32 weights and optimiser, bf16 matmuls); auto picks bf16 "
                        "where the GPU or CPU (AVX512-BF16/AMX) runs it natively")
    p.add_argument("--force", action="store_true",
                   help="rebuild the corpus and tokenizer even when they exist (then delete data/runs/ too)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    p.add_argument("--max-mb-per-domain", type=float, default=30.0, help="corpus cap per domain (MB of text)")
    p.add_argument("--vocab-size", type=positive_int, default=8192, help="BPE vocabulary size")
    p.add_argument("--target-steps", type=positive_int, default=1000,
                   help="target optimiser steps (sets the LR schedule; training resumes up to it)")
    p.add_argument("--batch", type=positive_int, default=8, help="target sequences per step (256 tokens each)")
    p.add_argument("--lr", type=float, default=1.5e-3, help="target peak learning rate")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop target or head training after this long (resumable)")
    p.add_argument("--head-steps", type=positive_int, default=3000,
                   help="draft head optimiser steps (sets its LR schedule; training resumes up to it)")
    p.add_argument("--head-lr", type=probability, default=1e-3,
                   help="draft head peak learning rate (a run continuing an exported head warms up to it again: "
                        "lower it there, e.g. 3e-4)")
    p.add_argument("--draft-vocab", type=non_negative_int, default=None, metavar="N",
                   help="draft head: draft from the N most frequent training tokens only (EAGLE-3's reduced "
                        "vocabulary: a cheaper LM head per draft level); 0: the full vocabulary; default: what the "
                        "exported head has")
    p.add_argument("--head-passes", type=positive_int, default=2,
                   help="draft head training-time test: pass 1 feeds the true features, each further pass the "
                        "head's own predictions (as while drafting deeper levels)")
    p.add_argument("--drafter-steps", type=positive_int, default=None,
                   help="distillation steps per drafter (default: each drafter's recipe in training/distill.py)")
    p.add_argument("--teacher-windows", type=positive_int, default=None,
                   help="256-token windows per domain in the target's teacher cache (default: the recipe's)")
    p.add_argument("--on-policy", type=unit_fraction, default=0.75,
                   help="share of teacher windows the target continues itself (sampled at T 0.8 / top-p 0.95, at "
                        "T 1 and greedily) after a 64-token corpus prompt; 0 distils on corpus text only")
    p.add_argument("--distill-loss", choices=["kl", "tv"], default="kl",
                   help="drafter loss: forward KL to the target's top-32, or total variation (1 - acceptance)")
    p.add_argument("--drafters", nargs="+", default=None, choices=DRAFTER_NAMES,
                   help="only these drafters (default: all four)")
    p.set_defaults(func=cmd_train)
