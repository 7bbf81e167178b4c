"""`specfleet bench engine`: tokens/s of Hugging Face's decoding modes and of specfleet's proposers, measured side
by side in one run on the same held-out prompts, greedy and sampled, with the outputs' distinct-4 beside each
figure (a looping target flatters lookup drafting)."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from specfleet.engine.engine import Request
from specfleet.engine.factory import build_engine, load_model
from specfleet.engine.models import ModelSet
from specfleet.engine.sampling import SamplingParams
from specfleet.training.acceptance import distinct_n

SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, seed=0)
BATCHES = (1, 4, 16, 32)


@dataclass
class Prompt:
    domain: str
    ids: list[int]


def load_prompts(tokenizer, path: Path | None, limit: int, prompt_tokens: int) -> list[Prompt]:
    """Held-out prompts (bench/prompts.py, or a JSONL file with "prompt" and optional "domain"), round-robin over
    domains so a limit keeps the mix."""
    if path is None:
        from specfleet.bench.prompts import build_prompts

        items = build_prompts()
    else:
        items = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    by_domain: dict[str, list[dict]] = {}
    for item in items:
        by_domain.setdefault(item.get("domain", "mixed"), []).append(item)
    mixed = [group[i] for i in range(max(map(len, by_domain.values()))) for group in by_domain.values()
             if i < len(group)]
    return [Prompt(p.get("domain", "mixed"),
                   tokenizer(p["prompt"], add_special_tokens=False).input_ids[-prompt_tokens:]) for p in mixed[:limit]]


def _hf_run(target, prompts: list[Prompt], new_tokens: int, sampled: bool, pad_id: int, **kwargs):
    outs = []
    with torch.no_grad():  # warm-up: the first generate call pays one-time setup
        target.generate(torch.tensor([prompts[0].ids], device=target.device), max_new_tokens=4, pad_token_id=pad_id,
                        do_sample=False,
                        **{k: v(prompts[0].domain) if callable(v) else v for k, v in kwargs.items()})
    start = time.perf_counter()
    with torch.no_grad():
        for i, p in enumerate(prompts):
            extra = dict(kwargs)
            if callable(extra.get("assistant_model")):
                extra["assistant_model"] = extra["assistant_model"](p.domain)
            if sampled:
                torch.manual_seed(SAMPLED.seed + i)
                extra.update(do_sample=True, temperature=SAMPLED.temperature, top_p=SAMPLED.top_p, top_k=0)
            else:
                extra.update(do_sample=False)
            ids = target.generate(torch.tensor([p.ids], device=target.device), max_new_tokens=new_tokens,
                                  pad_token_id=pad_id, **extra)
            outs.append(ids[0, len(p.ids):].tolist())
    return outs, time.perf_counter() - start, None


def _engine_run(engine, prompts: list[Prompt], new_tokens: int, sampled: bool):
    params = [SamplingParams(SAMPLED.temperature, SAMPLED.top_p, 0, SAMPLED.seed + i) if sampled else SamplingParams()
              for i in range(len(prompts))]
    reqs = [Request(str(i), p.ids, new_tokens, params[i]) for i, p in enumerate(prompts)]
    # warm-up (allocator, caches) on a request that is none of the measured ones: the suffix proposer's global trie
    # keeps every finished output, and a warm-up on the first prompt with its own seed handed the measured run that
    # prompt's whole output to draft from
    engine.generate([Request("warm-up", prompts[0].ids[::-1], 8, params[0])])
    start = time.perf_counter()
    results = engine.generate(reqs)
    seconds = time.perf_counter() - start
    rounds = sum(r.stats["rounds"] for r in results)
    accepted = sum(r.stats["accepted_tokens"] for r in results) / max(1, rounds)
    return [r.token_ids for r in results], seconds, accepted


REFERENCE_ROWS = ("hf-greedy", "hf-sample", "specfleet-none")  # every ratio and the lossless check need them


def run(models_dir: Path, prompts_path: Path | None, new_tokens: int, limit: int, output: Path,
        progress: bool = True, prompt_tokens: int = 64, batches: tuple[int, ...] = BATCHES,
        systems: tuple[str, ...] | None = None, device: str = "cpu", dtype: str = "auto") -> dict:
    """systems: only these rows (plus the reference rows); None: all. device / dtype: as --device / --dtype (every
    row, Hugging Face's too, runs there). The draft head's rows (specfleet-head,
    specfleet-head-k4, and specfleet-fused-nohead: fused without the head, which specfleet-fused includes) run when
    the models folder holds a head."""
    from tqdm import tqdm
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(models_dir / "target"))
    models = ModelSet.bundled(models_dir).with_overrides(dtype=dtype, device=device)  # ValueError: a device not here
    target = load_model(models, "target")
    drafters = {d: load_model(models, f"drafter-{d}") for d in ("python", "prose", "c", "general")}
    prompts = load_prompts(tok, prompts_path, limit, prompt_tokens)
    # a batch of b needs b requests in flight: the batched rows run on at least max(batches) prompts
    batch_prompts = load_prompts(tok, prompts_path, max(limit, *batches), prompt_tokens)
    pad = tok.pad_token_id

    def matching(domain):
        return drafters.get(domain, drafters["general"])

    def engine(proposer, batch, drafter_names=None, adaptive=True):
        return build_engine(models, proposer, drafter_names, batch_size=batch, target=target, adaptive=adaptive)

    plan = []  # (system, batch, sampled, thunk)
    for sampled in (False, True):
        plan += [("hf-sample" if sampled else "hf-greedy", 1, sampled,
                  lambda s=sampled: _hf_run(target, prompts, new_tokens, s, pad))]
        if not sampled:
            plan += [("hf-assisted", 1, False, lambda: _hf_run(target, prompts, new_tokens, False, pad,
                                                                 assistant_model=matching)),
                     ("hf-prompt-lookup", 1, False, lambda: _hf_run(target, prompts, new_tokens, False, pad,
                                                                      prompt_lookup_num_tokens=10))]
        for proposer in ("none", "model", "suffix", "fused"):
            plan.append((f"specfleet-{proposer}", 1, sampled,
                         lambda p=proposer, s=sampled: _engine_run(engine(p, 1), prompts, new_tokens, s)))
        # k = 4 every round, no speculation control: what the drafts accept, whether or not drafting them pays
        for proposer in ("model", "fused"):
            plan.append((f"specfleet-{proposer}-k4", 1, sampled,
                         lambda p=proposer, s=sampled: _engine_run(engine(p, 1, adaptive=False), prompts,
                                                                   new_tokens, s)))
        if (models_dir / "head" / "head.json").exists():
            plan.append(("specfleet-head", 1, sampled,
                         lambda s=sampled: _engine_run(engine("head", 1), prompts, new_tokens, s)))
            plan.append(("specfleet-head-k4", 1, sampled,
                         lambda s=sampled: _engine_run(engine("head", 1, adaptive=False), prompts, new_tokens, s)))
            plan.append(("specfleet-fused-nohead", 1, sampled,
                         lambda s=sampled: _engine_run(engine("fused", 1, "python,prose,c"), prompts,
                                                       new_tokens, s)))
    for sampled in (False, True):
        for batch in batches:
            if batch == 1:
                continue
            for proposer in ("none", "fused"):
                plan.append((f"specfleet-{proposer}", batch, sampled,
                             lambda p=proposer, b=batch, s=sampled: _engine_run(engine(p, b), batch_prompts,
                                                                                new_tokens, s)))

    if systems is not None:
        unknown = set(systems) - {system for system, *_ in plan}
        if unknown:
            raise ValueError(f"unknown system(s) {', '.join(sorted(unknown))}; this run has "
                             f"{', '.join(dict.fromkeys(system for system, *_ in plan))}")
        plan = [row for row in plan if row[0] in systems or row[0] in REFERENCE_ROWS]
    results, outputs = [], {}
    bar = tqdm(plan, desc="bench engine", unit="system", disable=not progress)
    for system, batch, sampled, thunk in bar:
        bar.set_postfix_str(f"{system} b{batch}{' sampled' if sampled else ''}")
        outs, seconds, accepted = thunk()
        tokens = sum(len(o) for o in outs)
        outputs[(system, batch, sampled)] = outs
        results.append({"system": system, "batch": batch, "mode": "sampled" if sampled else "greedy",
                        "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
                        "mean_accepted_len": None if accepted is None else round(accepted, 3),
                        "distinct_4": round(distinct_n(outs, 4), 3)})
    _add_ratios(results)
    greedy_ref = outputs[("hf-greedy", 1, False)]
    for row in results:  # lossless check beside the speed: greedy outputs must equal the target's own
        if row["mode"] == "greedy":
            got = outputs[(row["system"], row["batch"], False)]
            if row["batch"] == 1:
                same = sum(a == b for a, b in zip(got, greedy_ref, strict=True))
                row["identical_to_hf_greedy"] = f"{same}/{len(greedy_ref)}"
            else:  # more prompts than the batch-1 rows: checked against plain batched decoding instead
                plain = outputs[("specfleet-none", row["batch"], False)]
                same = sum(a == b for a, b in zip(got, plain, strict=True))
                row["identical_to_plain"] = f"{same}/{len(plain)}"
    report = {"config": {"prompts": len(prompts), "batched_prompts": len(batch_prompts),
                         "domains": sorted({p.domain for p in prompts}),
                         "max_new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
                         "sampled": {"temperature": SAMPLED.temperature, "top_p": SAMPLED.top_p},
                         "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                         "torch_threads": torch.get_num_threads(), "device": _device_name(models.torch_device),
                         "dtype": str(target.dtype).removeprefix("torch.")},
              "results": results}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, output.with_suffix(".png"))
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _add_ratios(results: list[dict]) -> None:
    """The headline: each row against the same engine's plain decoding (`specfleet-none`) at the same batch size and
    mode, measured in the same run; Hugging Face ratios are secondary (its plain loop is slower than ours)."""
    base = {r["mode"]: r["tokens_per_s"] for r in results if r["system"] in ("hf-greedy", "hf-sample")}
    plain = {(r["mode"], r["batch"]): r["tokens_per_s"] for r in results if r["system"] == "specfleet-none"}
    for r in results:
        key = "speedup_vs_hf_greedy" if r["mode"] == "greedy" else "speedup_vs_hf_sample"
        r[key] = round(r["tokens_per_s"] / base[r["mode"]], 3)
        if (r["mode"], r["batch"]) in plain:
            r["speedup_vs_plain"] = round(r["tokens_per_s"] / plain[r["mode"], r["batch"]], 3)


def format_table(report: dict) -> str:
    """The headline first: every specfleet row against the same engine's plain decoding at its batch size and
    mode; then Hugging Face's rows, for reference."""
    def row(r, vs_hf=False):
        acc = "-" if r["mean_accepted_len"] is None else f"{r['mean_accepted_len']:.2f}"
        tail = f"{r.get('speedup_vs_hf_greedy', r.get('speedup_vs_hf_sample')):>7.2f}x" if vs_hf else ""
        return (f"{r['system']:<20}{r['mode']:<9}{r['batch']:>6}{r['tokens_per_s']:>9.1f}"
                f"{r.get('speedup_vs_plain', float('nan')):>9.2f}x{acc:>11}{r['distinct_4']:>12.2f}{tail}")

    head = f"{'system':<20}{'mode':<9}{'batch':>6}{'tok/s':>9}{'vs plain':>10}{'acc/round':>11}{'distinct-4':>12}"
    ours = [r for r in report["results"] if r["system"].startswith("specfleet")]
    ours.sort(key=lambda r: (r["mode"] != "greedy", r["batch"]))
    lines = ["speculative vs plain decoding, same engine, same run", head, *(row(r) for r in ours), "",
             "Hugging Face transformers, for reference (vs plain: against specfleet-none)", head + f"{'vs HF':>8}",
             *(row(r, vs_hf=True) for r in report["results"] if not r["system"].startswith("specfleet"))]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    single = [r for r in report["results"] if r["batch"] == 1]
    labels = [f"{r['system']}\n{r['mode']}" for r in single]
    colors = ["#888" if r["system"].startswith("hf") else "#2a7" for r in single]
    left.bar(range(len(single)), [r["tokens_per_s"] for r in single], color=colors)
    left.set_xticks(range(len(single)), labels, rotation=60, ha="right", fontsize=7)
    left.set_ylabel("tokens/s (batch 1)")
    left.set_title("batch 1: HF (grey) vs specfleet (green)")
    for system in ("specfleet-none", "specfleet-fused"):
        rows = sorted((r for r in report["results"] if r["system"] == system and r["mode"] == "greedy"),
                      key=lambda r: r["batch"])
        right.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o",
                   label=system.replace("specfleet-none", "plain batched (specfleet-none)"))
    right.set_xscale("log", base=2)
    right.set_xlabel("batch size")
    right.set_ylabel("tokens/s")
    right.set_title("batch sweep, greedy")
    right.legend()
    cfg = report["config"]
    fig.suptitle(f"specfleet bench engine: {cfg['prompts']} held-out prompts, {cfg['max_new_tokens']} new tokens, "
                 f"{cfg['device']} ({cfg['torch_threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
