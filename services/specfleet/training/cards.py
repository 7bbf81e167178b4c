"""Writes models/README.md: a model card per bundled model and the acceptance matrix, from each folder's
training.json and the acceptance benchmark's JSON."""

from __future__ import annotations

import json
from pathlib import Path

from specfleet.training.acceptance import format_table, specialisation
from specfleet.training.corpus import DOMAINS
from specfleet.training.family import MODEL_NAMES

DATA_NOTE = (
    "Corpora are built by `specfleet train corpus` from the Python installation's stdlib and headers and the "
    "project venv's site-packages only (never the OS's docs or headers): **python** = `.py` files; **prose** = "
    "Markdown/reST files, package long descriptions, docstrings of 300+ characters and `pydoc` topics; **c** = "
    "C/C++ headers and sources shipped in packages (mostly torch's `include/`) and CPython's headers. Documents are "
    "deduplicated by normalised content and split train/validation by content hash (3% validation). The packages "
    "`pygments`, `yaml`, `jwt`, `requests`, `urllib3` (and vendored copies such as `pip/_vendor/requests`) are "
    "never read: they are held out for evaluation and benchmarks."
)


def _fmt_loss(losses: dict[str, float]) -> str:
    return ", ".join(f"{d} {losses[d]:.3f}" for d in DOMAINS if d in losses)


def _loss_curve(history: list[dict], rows: int = 12) -> list[str]:
    """The loss curve as a table: tokens seen against validation loss per domain (at most `rows` evaluations,
    evenly spaced, the last one always, and every annotated one, e.g. a loss re-measured on a rebuilt corpus)."""
    keep = {round(i * (len(history) - 1) / (rows - 1)) for i in range(rows)} if len(history) > rows else \
        set(range(len(history)))
    keep |= {i for i, h in enumerate(history) if h.get("note")}
    lines = ["Loss curve (validation loss in nats):", "", "| step | tokens seen | " + " | ".join(DOMAINS) + " | |",
             "|---|---|" + "---|" * len(DOMAINS) + "---|"]
    for i in sorted(keep):
        h = history[i]
        lines.append(f"| {h['step']} | {h['tokens_seen'] / 1e6:.2f} M | "
                     + " | ".join(f"{h['val'][d]:.3f}" for d in DOMAINS) + f" | {h.get('note', '')} |")
    return lines + [""]


def render(models_dir: Path, acceptance: dict | None) -> str:
    out = ["# Bundled models", "",
           "One byte-level BPE tokenizer (8,192 tokens, in every folder) and five Llama-architecture causal LMs, "
           "all trained on this project's machines from text found on them. Weights are stored as fp16 "
           "safetensors and load as float32. Load any of them offline:", "",
           "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
           'model = AutoModelForCausalLM.from_pretrained("models/target")',
           'tok = AutoTokenizer.from_pretrained("models/target")', "```", "",
           "Rebuild everything with `make models` (corpus → tokenizer → target → drafters → this card); "
           "training resumes from `data/runs/` checkpoints. Validation loss is next-token cross-entropy in nats "
           "on the validation split (fixed windows).", "", "## Data", "", DATA_NOTE, ""]
    for name in MODEL_NAMES:
        info_path = models_dir / name / "training.json"
        if not info_path.exists():
            out += [f"## {name}", "", "_not trained yet_", ""]
            continue
        info = json.loads(info_path.read_text())
        arch = info["arch"]
        domains = info.get("domains", list(DOMAINS))
        run = info.get("run", {})
        loss = {"kl": "forward KL", "tv": "total variation"}[run.get("loss", "kl")]
        on_policy = run.get("on_policy", 0.0)
        role = ("target: trained on an equal mix of all three domains" if info["role"] == "target" else
                f"drafter distilled from the target ({loss} to its top-{info['teacher_top_k']} next-token "
                f"distribution; {on_policy:.0%} of the windows continued by the target itself) on: "
                f"{', '.join(domains)}")
        out += [f"## {name}", "",
                f"- role: {role}",
                f"- architecture: LlamaForCausalLM, hidden {arch['hidden']}, {arch['layers']} layers, "
                f"{arch['heads']} heads, MLP {arch['intermediate']}, tied embeddings",
                f"- parameters: {info['parameters']:,}",
                f"- tokens seen: {info['tokens_seen']:,} ({info['train_seconds'] / 60:.0f} min on {info['device']})",
                f"- validation loss: {_fmt_loss(info['validation_loss'])}", ""]
        if len(info.get("history", [])) > 1:
            out += _loss_curve(info["history"])
    out += _head_card(models_dir)
    out += ["## Acceptance matrix", ""]
    if acceptance is None:
        out += ["_not measured yet: run `specfleet models acceptance`_", ""]
    else:
        cfg = acceptance["config"]
        out += [f"Mean tokens emitted per round of greedy speculative decoding (accepted draft tokens + the target's "
                f"own token; k + 1 = {cfg['k'] + 1} is the ceiling), k = {cfg['k']}, against the target on "
                f"{cfg['prompts']} validation prompts per domain ({cfg['prompt_tokens']} prompt tokens, "
                f"{cfg['new_tokens']} new tokens). Best drafter per domain in bold. Accepted draft tokens per "
                "round alone are these figures minus one. The last row is the share of distinct 4-grams in the "
                "target's greedy continuations (1.0 = never repeats): a target that loops flatters every drafter. "
                "Regenerate with `specfleet models acceptance` "
                "(writes `bench/acceptance.json` and this table).", "",
                format_table(acceptance), "",
                "The `target` row drafts with the target itself: every draft is accepted, so it shows the ceiling "
                f"for {cfg['new_tokens']} tokens (the last round is cut short).", ""]
        if "target_distinct4_sampled" in acceptance:
            sampled = cfg["sampled"]
            out += ["### Sampled requests", "",
                    f"The same, for requests sampled at temperature {sampled['temperature']} and top-p "
                    f"{sampled['top_p']}, as the engine serves them: each drafter samples its draft from its own "
                    "warped distribution q with the noise of the output position, and a draft is accepted when it "
                    "equals the target's own sample there (Gumbel coupling). α beside each figure is the mean over "
                    "positions of Σ min(p, q) = 1 − TV(p, q), the acceptance probability of standard speculative "
                    "sampling. The last row is the distinct-4 of the target's sampled continuations.", "",
                    format_table(acceptance, sampled=True), ""]
        out += ["### Specialisation", "",
                "Each specialist on its own domain against the best other specialist there (goal: ratio ≥ 1.2 and "
                "≥ 2.0 tokens per round).", "",
                "| specialist | requests | domain | tokens/round | best other specialist | ratio |",
                "|---|---|---|---|---|---|"]
        kinds = [("greedy", False)] + ([("sampled", True)] if "target_distinct4_sampled" in acceptance else [])
        for kind, sampled_rows in kinds:
            for name, row in specialisation(acceptance["matrix"], sampled=sampled_rows).items():
                out.append(f"| {name} | {kind} | {row['domain']} | {row['tokens_per_round']:.2f} | "
                           f"{row['best_other_specialist']} ({row['best_other_tokens_per_round']:.2f}) | "
                           f"{row['ratio']:.2f} |")
        out.append("")
        if acceptance.get("head_gain"):
            out += ["### Draft head against the specialists", "",
                    "Accepted draft tokens per round of the head (simulated round by round: its deeper drafts read "
                    "its own predicted features) over the best specialist's on each domain (goal: ≥ 1.3).", "",
                    "| domain | requests | head | best specialist | ratio |", "|---|---|---|---|---|"]
            for domain, row in acceptance["head_gain"].items():
                for kind, cell in row.items():
                    out.append(f"| {domain} | {kind} | {cell['head']:.2f} | {cell['best_specialist']} "
                               f"({cell['specialist']:.2f}) | {cell['ratio']:.2f} |")
            out.append("")
    return "\n".join(out)


def _head_card(models_dir: Path) -> list[str]:
    """The draft head's card entry (models/head/head.json), or nothing when there is none."""
    path = models_dir / "head" / "head.json"
    if not path.exists():
        return []
    info = json.loads(path.read_text())
    out = ["## head", "",
           "- role: EAGLE-style draft head for the bundled target (one Llama decoder layer over the target's "
           "final-norm hidden state joined with the next token's embedding by a linear layer; drafts through the "
           "target's own LM head; trained with a training-time-test pass on its own predicted features). "
           f"It reads this target's features only (target fingerprint {info.get('target_fingerprint')}).",
           f"- parameters: {info.get('parameters', 0):,} (stored in bfloat16; the embedding and LM head are the "
           "target's, not stored)",
           f"- tokens seen: {info.get('tokens_seen', 0):,} ({info.get('train_seconds', 0) / 60:.0f} min, "
           f"{info.get('precision', 'fp32')})"]
    vocab = info.get("draft_vocab")
    if vocab:
        out.append(f"- draft vocabulary: the {vocab['size']:,} most frequent training tokens (EAGLE-3's reduced "
                   "vocabulary: a draft level reads only their rows of the LM head); validation tokens inside it: "
                   + ", ".join(f"{d} {c:.1%}" for d, c in vocab["validation_coverage"].items()))
    val = info.get("validation", {})
    if val:
        out.append("- validation (held-out windows): " + "; ".join(
            f"{d} loss {v['loss']:.3f}, top-1 agreement with the target {v['top1'][0]:.2f} (own features: "
            f"{v['top1'][-1]:.2f})" for d, v in val.items()))
    history = info.get("history", [])
    if len(history) > 1:
        keep = sorted({round(i * (len(history) - 1) / 7) for i in range(8)}) if len(history) > 8 else \
            range(len(history))
        out += ["", "| step | tokens seen | " + " | ".join(f"{d} top-1" for d in DOMAINS) + " |",
                "|---|---|" + "---|" * len(DOMAINS)]
        for i in keep:
            h = history[i]
            out.append(f"| {h['step']} | {h['tokens_seen'] / 1e6:.2f} M | "
                       + " | ".join(f"{h['val'][d]['top1'][0]:.3f}" for d in DOMAINS if d in h["val"]) + " |")
    return out + [""]


def write_card(models_dir: Path, acceptance_json: Path) -> Path:
    acceptance = json.loads(acceptance_json.read_text()) if acceptance_json.exists() else None
    path = models_dir / "README.md"
    path.write_text(render(models_dir, acceptance))
    return path
