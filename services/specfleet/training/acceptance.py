"""Measures the acceptance matrix: mean tokens per round of greedy speculative decoding at draft length k,
for every drafter x domain, against the target on held-out validation text.

Greedy speculative decoding with a chain draft emits exactly the target's greedy continuation; a round
accepts draft tokens while the drafter's greedy choice equals the target's, then adds one target token
(the correction or bonus). Draft token j+1 only matters when draft token j was accepted, i.e. when the
drafter's context equals the target's continuation so far, so the drafter's choices that matter are its
argmaxes on the teacher-forced target continuation: one drafter forward pass per prompt measures every
round exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specfleet.training.corpus import DOMAINS
from specfleet.training.family import DRAFTER_NAMES, DRAFTERS
from specfleet.training.train import TokenFile, load_model, set_threads


@dataclass
class AcceptanceConfig:
    k: int = 4
    prompts: int = 48
    prompt_tokens: int = 64
    new_tokens: int = 96
    seed: int = 2026


@torch.no_grad()
def greedy_continuation(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The target's plain greedy continuation [batch, new_tokens] (no stop on EOS), with a KV cache."""
    out = model(input_ids=prompts, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [nxt]
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
    return torch.cat(tokens, dim=1)


def distinct_n(rows: torch.Tensor | list[list[int]], n: int = 4) -> float:
    """Share of distinct n-grams among all n-grams of each row, pooled: near 0 for text that loops."""
    total, distinct = 0, 0
    for row in rows.tolist() if isinstance(rows, torch.Tensor) else rows:
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        total += len(grams)
        distinct += len(set(grams))
    return distinct / total if total else 0.0


def rounds_for(matches: np.ndarray, k: int) -> tuple[int, int]:
    """(rounds, accepted draft tokens) to emit len(matches) tokens, where matches[j] says whether the
    drafter's greedy choice equals the target's token j given the target's tokens before it."""
    n, i, rounds, accepted = len(matches), 0, 0, 0
    while i < n:
        a = 0
        while a < k and i + a < n and matches[i + a]:
            a += 1
        rounds += 1
        accepted += min(a, n - i)
        i += a + 1  # accepted drafts plus the target's own token
    return rounds, accepted


@torch.no_grad()
def drafter_matches(drafter, prompts: torch.Tensor, continuation: torch.Tensor) -> np.ndarray:
    """[batch, new_tokens] booleans: drafter argmax == target token, teacher-forced on the target's text."""
    seq = torch.cat([prompts, continuation], dim=1)
    logits = drafter(input_ids=seq[:, :-1]).logits[:, prompts.shape[1] - 1:]  # predicts continuation tokens
    return (logits.argmax(-1) == continuation).numpy()


def measure(models_dir: Path, tokens_dir: Path, cfg: AcceptanceConfig, drafters=DRAFTER_NAMES,
            domains=DOMAINS, target_dir: Path | None = None) -> dict:
    """Returns {"config", "matrix": {drafter: {domain: {"tokens_per_round", "accepted_per_round", ...}}}}."""
    set_threads()
    target = load_model(target_dir or models_dir / "target")
    prompts, continuations = {}, {}
    for i, domain in enumerate(domains):
        tf = TokenFile(tokens_dir / f"{domain}.val.bin")
        prompts[domain] = tf.windows(np.random.default_rng([cfg.seed, i]), cfg.prompts, cfg.prompt_tokens)
        continuations[domain] = torch.cat([greedy_continuation(target, p, cfg.new_tokens)
                                           for p in tqdm(prompts[domain].split(16), desc=f"target greedy {domain}")])
    # A target that loops makes any drafter look good: report how varied its continuations are.
    distinct4 = {d: round(distinct_n(continuations[d], 4), 3) for d in domains}
    matrix: dict[str, dict[str, dict]] = {}
    for name in drafters:
        drafter = target if name == "target" else load_model(models_dir / name)
        matrix[name] = {}
        for domain in domains:
            m = drafter_matches(drafter, prompts[domain], continuations[domain])
            per_prompt = np.array([rounds_for(row, cfg.k) for row in m])  # [prompts, (rounds, accepted)]
            rounds, accepted = per_prompt.sum(axis=0).tolist()
            emitted = m.size
            matrix[name][domain] = {
                "tokens_per_round": round(emitted / rounds, 3),
                "accepted_per_round": round(accepted / rounds, 3),
                "top1_agreement": round(float(m.mean()), 3),
                "rounds": int(rounds),
            }
    return {"config": cfg.__dict__, "target_distinct4": distinct4, "matrix": matrix,
            "specialisation": specialisation(matrix)}


def specialisation(matrix: dict) -> dict[str, dict]:
    """For each specialist drafter (one domain), its own-domain tokens per round against the best other
    specialist's on that domain."""
    specialists = {n: DRAFTERS[n][0] for n in matrix if n in DRAFTERS and len(DRAFTERS[n]) == 1}
    out = {}
    for name, domain in specialists.items():
        own = matrix[name][domain]["tokens_per_round"]
        rival, best = max(((n, matrix[n][domain]["tokens_per_round"]) for n in specialists if n != name),
                          key=lambda item: item[1])
        out[name] = {"domain": domain, "tokens_per_round": own, "best_other_specialist": rival,
                     "best_other_tokens_per_round": best, "ratio": round(own / best, 3)}
    return out


def format_table(result: dict) -> str:
    """Markdown table of tokens per round (accepted drafts + 1), drafters as rows and domains as columns."""
    matrix = result["matrix"]
    domains = list(next(iter(matrix.values())))
    lines = ["| drafter | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for name, row in matrix.items():
        best = {d: max(matrix[n][d]["tokens_per_round"] for n in matrix if n != "target") for d in domains}
        cells = []
        for d in domains:
            v = row[d]["tokens_per_round"]
            cells.append(f"**{v:.2f}**" if v == best[d] and name != "target" else f"{v:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "target_distinct4" in result:
        lines.append("| _target output distinct-4_ | " + " | ".join(
            f"_{result['target_distinct4'][d]:.2f}_" for d in domains) + " |")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
