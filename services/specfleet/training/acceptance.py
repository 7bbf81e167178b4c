"""Measures the acceptance matrix: mean tokens per round of greedy speculative decoding at draft length k,
for every drafter x domain, against the target on held-out validation text.

Greedy speculative decoding with a chain draft emits exactly the target's greedy continuation; a round
accepts draft tokens while the drafter's greedy choice equals the target's, then adds one target token
(the correction or bonus). Draft token j+1 only matters when draft token j was accepted, i.e. when the
drafter's context equals the target's continuation so far, so the drafter's choices that matter are its
argmaxes on the teacher-forced target continuation: one drafter forward pass per prompt measures every
round exactly.

Sampled requests (`Warps`, passed in by the caller so that this stays beneath the engine) are measured the same
way: the target's continuation is its own position-keyed sample (the engine's output for that seed), a drafter's
draft at a position is its own sample from q with the same position's noise, and a draft is accepted exactly when
it equals the target's sample there. Beside the measured rounds, the sampled acceptance rate is the mean over
positions of sum_t min(p, q) = 1 - TV(p, q), the acceptance probability of standard speculative sampling.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

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
    sampled: dict = field(default_factory=lambda: {"temperature": 0.8, "top_p": 0.95})


@dataclass(frozen=True)
class Warps:
    """The engine's sampled processing under the measured sampling parameters: target_probs(logits [..., V]) is what
    the target samples from, draft_probs(logits) what a drafter draws its draft from, and sample(probs [B, V],
    seeds, positions) -> [B] the position-keyed draw both use."""

    target_probs: Callable[[torch.Tensor], torch.Tensor]
    draft_probs: Callable[[torch.Tensor], torch.Tensor]
    sample: Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]


def _argmax(logits: torch.Tensor, position: int) -> torch.Tensor:
    return logits.argmax(-1, keepdim=True)


@torch.no_grad()
def continuation(model, prompts: torch.Tensor, new_tokens: int,
                 pick: Callable[[torch.Tensor, int], torch.Tensor] = _argmax) -> torch.Tensor:
    """The model's plain continuation [batch, new_tokens] (no stop on EOS), with a KV cache: pick(logits [B, V],
    position) -> [B, 1] chooses the token at each output position (default: greedy)."""
    out = model(input_ids=prompts, use_cache=True)
    past, nxt = out.past_key_values, pick(out.logits[:, -1], 0)
    tokens = [nxt]
    for position in range(1, new_tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, pick(out.logits[:, -1], position)
        tokens.append(nxt)
    return torch.cat(tokens, dim=1)


def greedy_continuation(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The target's plain greedy continuation [batch, new_tokens] (no stop on EOS), with a KV cache."""
    return continuation(model, prompts, new_tokens)


def sampled_continuation(model, prompts: torch.Tensor, new_tokens: int, warps: Warps, seeds: list[int]) -> torch.Tensor:
    """What the engine emits for prompts[b] sampled with seed seeds[b]: the target's position-keyed sample at every
    output position (the noise of position j is that of the request's j-th output token)."""
    def pick(logits, position):
        return warps.sample(warps.target_probs(logits), seeds, [position] * len(seeds)).unsqueeze(-1)
    return continuation(model, prompts, new_tokens, pick)


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


@torch.no_grad()
def sampled_matches(drafter, target_logits: torch.Tensor, prompts: torch.Tensor, continuation: torch.Tensor,
                    warps: Warps, seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """([batch, new_tokens] booleans: the drafter's position-keyed sample == the target's, [batch, new_tokens]
    sum_t min(p, q)), teacher-forced on the target's sampled text; target_logits [batch, new_tokens, V] are the
    target's own on the same text."""
    seq = torch.cat([prompts, continuation], dim=1)
    logits = drafter(input_ids=seq[:, :-1]).logits[:, prompts.shape[1] - 1:]  # [B, n, V]
    q = warps.draft_probs(logits)
    overlap = torch.minimum(warps.target_probs(target_logits), q).sum(-1)  # [B, n]
    n = continuation.shape[1]
    drafts = torch.stack([warps.sample(q[b], [seeds[b]] * n, list(range(n))) for b in range(len(seeds))])
    return (drafts == continuation).numpy(), overlap.numpy()


class HeadDrafter(Protocol):
    """A draft head as the engine runs it (passed in by the caller, as `Warps` are): drafts a chain of k tokens
    for each request from its context and the target's features of context[:-1]; sampled requests (seeds given)
    draw with their noise at each output position. `release` frees the requests' caches."""

    def __call__(self, rids: list[str], contexts: list[list[int]], features: list[torch.Tensor], k: int,
                 seeds: list[int] | None, positions: list[int]) -> list[list[int]]: ...

    def release(self, rids: list[str]) -> None: ...


@torch.no_grad()
def head_cell(head: HeadDrafter, target, prompts: torch.Tensor, continuation: torch.Tensor, k: int,
              seeds: list[int] | None = None, tag: str = "") -> dict:
    """Rounds of a draft head emitting the target's continuation, simulated round by round: unlike a drafter's,
    a head's draft at depth 2+ reads its own predicted features, so teacher forcing would overstate it. Each round
    drafts k levels from the context so far (features from the target over the true tokens, as the verifier
    keeps them), accepts the matching prefix, then adds the target's own token."""
    seq = torch.cat([prompts, continuation], dim=1)
    p, n = prompts.shape[1], continuation.shape[1]
    feats = target.model(input_ids=seq[:, :-1]).last_hidden_state.float()  # [B, p + n - 1, H]
    pos = [0] * len(seq)
    rids = [f"{tag}{b}" for b in range(len(seq))]
    rounds = accepted = first = 0
    while True:
        live = [b for b in range(len(seq)) if pos[b] < n]
        if not live:
            break
        chains = head([rids[b] for b in live], [seq[b, :p + pos[b]].tolist() for b in live],
                      [feats[b, :p + pos[b] - 1] for b in live], k,
                      None if seeds is None else [seeds[b] for b in live], [pos[b] for b in live])
        for b, chain in zip(live, chains, strict=True):
            want = continuation[b, pos[b]:pos[b] + k].tolist()
            a = 0
            while a < min(len(chain), len(want)) and chain[a] == want[a]:
                a += 1
            rounds += 1
            accepted += a
            first += int(bool(chain) and chain[0] == want[0])
            pos[b] += a + 1
    head.release(rids)
    return {"tokens_per_round": round(continuation.numel() / rounds, 3),
            "accepted_per_round": round(accepted / rounds, 3), "top1_agreement": round(first / rounds, 3),
            "rounds": int(rounds)}


def _cell(matches: np.ndarray, k: int) -> dict:
    per_prompt = np.array([rounds_for(row, k) for row in matches])  # [prompts, (rounds, accepted)]
    rounds, accepted = per_prompt.sum(axis=0).tolist()
    return {"tokens_per_round": round(matches.size / rounds, 3), "accepted_per_round": round(accepted / rounds, 3),
            "top1_agreement": round(float(matches.mean()), 3), "rounds": int(rounds)}


def measure(models_dir: Path, tokens_dir: Path, cfg: AcceptanceConfig, drafters=DRAFTER_NAMES,
            domains=DOMAINS, target_dir: Path | None = None, warps: Warps | None = None,
            heads: dict[str, HeadDrafter] | None = None) -> dict:
    """Returns {"config", "matrix": {drafter: {domain: {"tokens_per_round", "accepted_per_round", ...}}}}; with
    warps (the engine's processing at cfg.sampled), every cell also holds "sampled": the same for sampled requests
    plus "acceptance_rate" (mean sum min(p, q)). heads: draft heads by row name, measured on the same continuations
    (the bundled one as "head", which also gets "head_gain")."""
    set_threads()
    target = load_model(target_dir or models_dir / "target")
    prompts, continuations, sampled, target_logits, seeds = {}, {}, {}, {}, {}
    for i, domain in enumerate(domains):
        tf = TokenFile(tokens_dir / f"{domain}.val.bin")
        prompts[domain] = tf.windows(np.random.default_rng([cfg.seed, i]), cfg.prompts, cfg.prompt_tokens)
        continuations[domain] = torch.cat([greedy_continuation(target, p, cfg.new_tokens)
                                           for p in tqdm(prompts[domain].split(16), desc=f"target greedy {domain}")])
        if warps is None:
            continue
        seeds[domain] = [cfg.seed * 100_000 + i * 1000 + b for b in range(cfg.prompts)]
        sampled[domain] = torch.cat([
            sampled_continuation(target, p, cfg.new_tokens, warps, seeds[domain][j * 16:(j + 1) * 16])
            for j, p in enumerate(tqdm(prompts[domain].split(16), desc=f"target sampled {domain}"))])
        with torch.no_grad():
            seq = torch.cat([prompts[domain], sampled[domain]], dim=1)[:, :-1]
            target_logits[domain] = target(input_ids=seq).logits[:, cfg.prompt_tokens - 1:]
    # A target that loops makes any drafter look good: report how varied its continuations are.
    distinct4 = {d: round(distinct_n(continuations[d], 4), 3) for d in domains}
    matrix: dict[str, dict[str, dict]] = {}
    for name in tqdm(drafters, desc="drafters"):
        drafter = target if name == "target" else load_model(models_dir / name)
        matrix[name] = {}
        for domain in domains:
            matrix[name][domain] = _cell(drafter_matches(drafter, prompts[domain], continuations[domain]), cfg.k)
            if warps is not None:
                m, overlap = sampled_matches(drafter, target_logits[domain], prompts[domain], sampled[domain], warps,
                                             seeds[domain])
                matrix[name][domain]["sampled"] = {**_cell(m, cfg.k),
                                                   "acceptance_rate": round(float(overlap.mean()), 3)}
    # a draft head's row: simulated rounds (its deeper drafts read its own features)
    for name, head in (heads or {}).items():
        matrix[name] = {}
        for domain in tqdm(domains, desc=name):
            matrix[name][domain] = head_cell(head, target, prompts[domain], continuations[domain], cfg.k,
                                             tag=f"{domain}-greedy-")
            if warps is not None:
                matrix[name][domain]["sampled"] = head_cell(head, target, prompts[domain], sampled[domain], cfg.k,
                                                            seeds[domain], tag=f"{domain}-sampled-")
    result = {"config": cfg.__dict__, "target_distinct4": distinct4, "matrix": matrix,
              "specialisation": specialisation(matrix)}
    if "head" in matrix:
        result["head_gain"] = head_gain(matrix)
    if warps is not None:
        result["target_distinct4_sampled"] = {d: round(distinct_n(sampled[d], 4), 3) for d in domains}
        result["specialisation_sampled"] = specialisation(matrix, sampled=True)
    return result


def head_gain(matrix: dict) -> dict[str, dict]:
    """Per domain, the head's accepted draft tokens per round over the best specialist drafter's (greedy, and
    sampled where measured): the issue's goal is >= 1.3 everywhere."""
    specialists = [n for n in matrix if n in DRAFTERS and len(DRAFTERS[n]) == 1]
    out = {}
    for domain in matrix["head"]:
        row = {}
        for mode in ("greedy", "sampled"):
            def acc(name, domain=domain, mode=mode):
                cell = matrix[name][domain]
                return (cell if mode == "greedy" else cell.get("sampled", {})).get("accepted_per_round")

            if acc("head") is None or not specialists or any(acc(n) is None for n in specialists):
                continue
            best = max(specialists, key=acc)
            row[mode] = {"head": acc("head"), "best_specialist": best, "specialist": acc(best),
                         "ratio": round(acc("head") / max(acc(best), 1e-9), 3)}
        out[domain] = row
    return out


def specialisation(matrix: dict, sampled: bool = False) -> dict[str, dict]:
    """For each specialist drafter (one domain), its own-domain tokens per round against the best other
    specialist's on that domain (of sampled requests when sampled)."""
    def value(name, domain):
        cell = matrix[name][domain]
        return (cell["sampled"] if sampled else cell)["tokens_per_round"]

    specialists = {n: DRAFTERS[n][0] for n in matrix if n in DRAFTERS and len(DRAFTERS[n]) == 1}
    out = {}
    for name, domain in specialists.items():
        own = value(name, domain)
        rival, best = max(((n, value(n, domain)) for n in specialists if n != name), key=lambda item: item[1])
        out[name] = {"domain": domain, "tokens_per_round": own, "best_other_specialist": rival,
                     "best_other_tokens_per_round": best, "ratio": round(own / best, 3)}
    return out


def format_table(result: dict, sampled: bool = False) -> str:
    """Markdown table of tokens per round (accepted drafts + 1), drafters as rows and domains as columns; of sampled
    requests when sampled, with the acceptance rate (mean sum min(p, q)) beside each figure."""
    matrix = result["matrix"]
    domains = list(next(iter(matrix.values())))

    def cell(name, d):
        return matrix[name][d]["sampled"] if sampled else matrix[name][d]

    lines = ["| drafter | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for name in matrix:
        best = {d: max(cell(n, d)["tokens_per_round"] for n in matrix if n != "target") for d in domains}
        cells = []
        for d in domains:
            v = cell(name, d)["tokens_per_round"]
            text = f"**{v:.2f}**" if v == best[d] and name != "target" else f"{v:.2f}"
            alpha = cell(name, d).get("acceptance_rate")  # the head's row: simulated rounds, no single alpha
            cells.append(f"{text} (α {alpha:.2f})" if sampled and alpha is not None else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    distinct = result.get("target_distinct4_sampled" if sampled else "target_distinct4")
    if distinct:
        lines.append("| _target output distinct-4_ | " + " | ".join(f"_{distinct[d]:.2f}_" for d in domains) + " |")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
