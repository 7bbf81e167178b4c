"""Sampling parameters and the target's sampling distribution, warped exactly as Hugging Face `generate` does
(temperature, then top-k, then top-p), so that lossless speculative sampling reproduces plain sampling."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy decoding; top_p 1.0 and top_k 0 switch those filters off; seed None means a
    fresh random seed."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def kind(self) -> str:
        """"greedy" or "sampled": the speculation controller keeps their acceptance apart."""
        return "greedy" if self.greedy else "sampled"

    def validate(self) -> None:
        """Raises ValueError, saying what to fix, on parameters that define no distribution."""
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or math.isinf(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 switches top-p off), got {p!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 switches top-k off), got {k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None (None draws a fresh seed), got {self.seed!r}")


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities the target samples from under `params`.

    Same operations, in the same order, as transformers' TemperatureLogitsWarper, TopKLogitsWarper and
    TopPLogitsWarper (min_tokens_to_keep=1) followed by a softmax: top-k keeps every token tied with the k-th
    largest logit, and top-p drops the smallest tokens whose cumulative probability stays <= 1 - top_p. Greedy
    params (temperature 0) give the one-hot of the argmax (the first one on ties), which acceptance then follows
    exactly.
    """
    params.validate()
    if params.greedy:
        scores = logits.float()
        return torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).float()
    scores = _scaled_scores(logits, params)  # [..., V]
    if params.top_p < 1.0:
        scores = scores.masked_fill(_top_p_mask(scores, params.top_p), -math.inf)
    return scores.softmax(-1)


def _scaled_scores(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> float32 scores / temperature with top-k applied (-inf below the k-th largest, ties kept)."""
    scores = logits.float()
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k:
        kth_largest = torch.topk(scores, min(params.top_k, scores.shape[-1]))[0][..., -1:]  # [..., 1]
        scores = scores.masked_fill(scores < kth_largest, -math.inf)
    return scores


def _top_p_mask(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p's removal mask over [..., V] scores (Hugging Face's rule): numpy's values-only sort on a CPU with a real
    vocabulary (`_top_p_remove`), else torch's argsort."""
    if scores.device.type == "cpu" and scores.shape[-1] >= NUMPY_SORT_FROM:
        return _top_p_remove(scores, top_p)
    sorted_scores, sorted_index = torch.sort(scores, descending=False)  # [..., V] ascending
    sorted_remove = sorted_scores.softmax(-1).cumsum(-1) <= (1 - top_p)
    sorted_remove[..., -1:] = False  # keep at least one token
    return sorted_remove.scatter(-1, sorted_index, sorted_remove)


NUMPY_SORT_FROM = 1024  # CPU vocabularies at least this large are sorted by numpy (values only, SIMD sort)


def _top_p_remove(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p's removal mask on a CPU with a real vocabulary, without an argsort. numpy sorts the values alone (its
    SIMD sort: ~2.5x an argsort, ~7x torch's sort), which gives the very sequence Hugging Face's sort gives, so the
    softmax, the cumulative sums and hence how many of the smallest tokens go are bit for bit its own; the tokens
    removed are then those below the last removed value, and of the tokens tied at that value the first ones by id
    (Hugging Face's sort leaves the order of exact ties unspecified, and it may differ between torch versions)."""
    sorted_scores = torch.from_numpy(np.sort(scores.detach().contiguous().numpy(), axis=-1))  # [..., V] ascending
    sorted_remove = sorted_scores.softmax(-1).cumsum(-1) <= (1 - top_p)
    sorted_remove[..., -1:] = False  # keep at least one token
    count = sorted_remove.sum(-1, keepdim=True)  # [..., 1]: the `count` smallest go
    last = sorted_scores.gather(-1, (count - 1).clamp(min=0))  # [..., 1] the largest value that goes
    below = scores < last
    tied = scores == last
    ties_out = count - below.sum(-1, keepdim=True)  # how many of the tied tokens go
    remove = below | (tied & (tied.cumsum(-1) <= ties_out))
    return remove & (count > 0)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) (the first maximum on ties, as torch's), by numpy's SIMD argmax for float32 / float64 on the CPU:
    torch's CPU argmax over a vocabulary row costs ~6x numpy's (24 us against 4 us for 3 x 8192)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() >= 1 and x.shape[-1] > 0:
        return torch.from_numpy(np.asarray(x.detach().numpy().argmax(-1), dtype=np.int64))
    return x.argmax(-1)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: seeded for reproducible sampling, or from fresh entropy when seed is None."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


DRAFT_SUPPORT = 64  # top-p is applied among a drafter's likeliest tokens when its nucleus fits in this many


def draft_probs(logits: torch.Tensor, params: SamplingParams, support: int = DRAFT_SUPPORT) -> torch.Tensor:
    """[..., V] drafter logits -> [..., V] the distribution a sampled draft is drawn from: the request's temperature,
    top-k and top-p, as warp_probs applies them, without its full-vocabulary sort where it can (the sort costs more
    than a small drafter's step): top-p is applied among the `support` likeliest tokens whenever they hold the whole
    nucleus, else by warp_probs itself. Drafts never change the output (acceptance compares the draft with the
    target's own sample), so this need not match Hugging Face bit for bit; only the target's warp_probs must.
    Support: the `support` likeliest tokens, else 16x as many, else the whole vocabulary."""
    # temperature and top-k exactly as the target's (no sort without top-p); then top-p on the likeliest tokens
    probs = warp_probs(logits, dataclasses.replace(params, top_p=1.0))  # [..., V]
    if params.top_p >= 1.0:
        return probs
    vocab = probs.shape[-1]
    for width in (support, 16 * support):  # a flat distribution's nucleus may need the wider support
        if width >= vocab:
            return warp_probs(logits, params)
        values, index = probs.topk(width, dim=-1)  # [..., width] descending
        if not bool((values.sum(-1) < params.top_p).any()):
            break
    else:  # a nucleus wider than either support: the exact warp
        return warp_probs(logits, params)
    before = values.cumsum(-1) - values  # mass of the likelier tokens
    values = values.masked_fill(before >= params.top_p, 0.0)  # warp_probs' rule; the likeliest token always stays
    return torch.zeros_like(probs).scatter_(-1, index, values / values.sum(-1, keepdim=True))


def keyed_target_sample(logits: torch.Tensor, params: SamplingParams, seed: int, position: int) -> int:
    """The target's sampled token at output `position` from its raw logits [V]: argmax over the tokens `warp_probs`
    keeps (temperature, top-k, top-p) of scores / temperature + the position's Gumbel noise (`position_gumbels`), an
    exact draw from the warped distribution (Gumbel-max; softmax's normalisation shifts every kept token alike).

    Without warp_probs' sort where it can: the argmax over the whole vocabulary is the answer whenever top-p keeps
    that token, which holds when the probability of the tokens below it and of itself (one exp pass, summed in
    float64) is clearly more than 1 - top_p -- on the far side of a margin wider than the rounding of Hugging Face's
    float32 cumulative sum. Otherwise (a draw from the tail, a tie at its score, or a sum within the margin) the
    exact mask decides. The result is the same either way: one definition of plain sampling, which speculative
    acceptance reproduces token for token."""
    from specfleet_kernels.reference import position_gumbels

    scores = _scaled_scores(logits, params)  # [V]
    vocab = scores.shape[-1]
    noisy = scores + position_gumbels(seed, position, vocab).to(scores.device)  # [V]
    token = int(argmax(noisy))
    if params.top_p >= 1.0:
        return token
    probs = scores.softmax(-1).cpu().numpy()  # [V] (the verifier hands the host's rows: no copy)
    score = scores.cpu().numpy()
    x = score[token]
    margin = max(1e-4, 8.0 * vocab * 2.0 ** -24 * (1.0 - params.top_p))
    if int(np.count_nonzero(score == x)) == 1:
        # its ascending cumulative sum: the mass below it plus its own, so at least its own (non-negative terms):
        # a token alone past the bound needs no pass over the tokens below it (the same decision)
        own = float(probs[token])
        if own > (1.0 - params.top_p) + margin or \
                float(probs[score < x].sum(dtype=np.float64)) + own > (1.0 - params.top_p) + margin:
            return token
    return int(noisy.masked_fill(_top_p_mask(scores[None], params.top_p)[0], -math.inf).argmax())


def keyed_tree_accept(tokens: torch.Tensor, parents: torch.Tensor, logits: torch.Tensor, params: SamplingParams,
                      seed: int, start: int) -> tuple[list[int], int]:
    """`position_keyed_accept` from the target's raw logits [n + 1, V] (after the last context token, then after each
    node): only the rows the walk visits are sampled (`keyed_target_sample`), so a tree's unvisited branches and
    the sort of the whole vocabulary cost nothing. Returns (accepted node indices in path order, next token)."""
    from specfleet_kernels.reference import keyed_walk

    return keyed_walk(tokens, parents, lambda node, depth: keyed_target_sample(logits[node + 1], params, seed,
                                                                                start + depth))


class SubVocab:
    """Token ids (ascending, distinct) of a vocabulary of `size` tokens that a drafter's logits cover (a draft
    head's reduced vocabulary): its logits' column c is token ids[c]."""

    def __init__(self, ids: torch.Tensor, size: int):
        self.ids = ids.to(torch.long)
        self.size = int(size)
        self.id_list: list[int] = self.ids.tolist()


DRAFT_TAIL_SUPPORT = 64  # a draw that lands in the drafter's own top-p tail is redrawn among this many likeliest


def keyed_draft_sample(logits: torch.Tensor, params: SamplingParams, seeds: list[int], positions: list[int],
                       siblings: int = 0, sibling_rows: int | None = None, vocab: SubVocab | None = None
                       ) -> tuple[list[int], list[float], list[list[tuple[int, float]]]]:
    """Sampled drafts for rows of one request's parameters: logits [n, V] -> (tokens, confidences, alternatives).

    Row r's draft is the Gumbel-max draw with the noise of (seeds[r], positions[r]) -- the noise the target's own
    sample at that position uses (`keyed_target_sample`), which couples the two -- from the drafter's distribution
    under the request's temperature and top-k, and top-p as far as one exp pass tells: a draw whose cumulative mass
    (its own and every less likely token's) is within 1 - top_p, the drafter's tail, is redrawn among its
    DRAFT_TAIL_SUPPORT likeliest tokens. No sort of the vocabulary: drafts never change the output (acceptance
    compares the draft with the target's own sample), so q need only be close to the target's warp, not exact.
    Confidence: the token's probability under the temperature, over top_p (the nucleus' mass), capped at 1.

    alternatives[r]: up to `siblings` further (token, confidence) per row, the next best of the same noisy scores
    among the DRAFT_TAIL_SUPPORT likeliest tokens -- where the target's own sample most likely lies when it is not
    the draft (the two share the noise), so siblings cover more of it than the drafter's plain runner-up does.
    sibling_rows: only the first that many rows get alternatives (None: every row); the others' lists stay empty.

    vocab: the logits' columns are these token ids of a larger vocabulary (a draft head's reduced one): the draw
    uses those tokens' noise and returns token ids, as over the full vocabulary with every other token at -inf,
    without building that [n, full vocabulary] tensor."""
    from specfleet_kernels.reference import position_gumbels

    scores = _scaled_scores(logits, params)  # [n, V]
    n, width = scores.shape
    full = width if vocab is None else vocab.size

    def noise_of(seed: int, position: int) -> torch.Tensor:
        row = position_gumbels(seed, position, full)
        return row if vocab is None else row.index_select(0, vocab.ids)

    if len(set(zip(seeds, positions, strict=True))) == 1:  # one request's drafters at one position: shared noise
        noise = noise_of(seeds[0], positions[0]).to(scores.device)[None].expand(n, width)
    else:
        noise = torch.stack([noise_of(s, p) for s, p in zip(seeds, positions, strict=True)]).to(
            scores.device)  # [n, V], made on the host: one copy to the drafter's device
    tokens = argmax(scores + noise)  # [n] on the host
    probs = scores.softmax(-1)  # [n, V]
    chosen = probs.gather(-1, tokens.to(scores.device)[:, None])[:, 0].tolist()  # one copy to the host
    drawn = tokens.tolist()
    if params.top_p < 1.0:
        # a row's mass at or below its token is at least the token's own probability (a sum of it and non-negative
        # terms, rounded monotonically): only rows whose token alone holds at most 1 - top_p may be in the tail, and
        # only they pay the pass over the vocabulary (the same rows are redrawn as with the pass over every row)
        for r in [r for r, q in enumerate(chosen) if q <= 1.0 - params.top_p]:  # rare (a sync per row)
            at_or_below = float((probs[r] * (scores[r] <= scores[r, drawn[r]])).sum())
            if at_or_below <= 1.0 - params.top_p:  # in the tail: redrawn among the likeliest
                values, index = scores[r].topk(min(DRAFT_TAIL_SUPPORT, width))
                drawn[r] = int(index[(values + noise[r, index]).argmax()])
                chosen[r] = float(probs[r, drawn[r]])
    scale = 1.0 / params.top_p if params.top_p < 1.0 else 1.0
    alternatives: list[list[tuple[int, float]]] = [[] for _ in seeds]
    m = n if sibling_rows is None else min(sibling_rows, n)
    if siblings > 0 and m > 0:
        values, index = scores[:m].topk(min(DRAFT_TAIL_SUPPORT, width), dim=-1)  # [m, S]
        order = (values + noise[:m].gather(-1, index)).topk(min(siblings + 1, index.shape[-1]), dim=-1).indices
        ranked = index.gather(-1, order)  # [m, siblings + 1]: best noisy first
        ranked_probs = probs[:m].gather(-1, ranked)
        for r, (row, row_probs) in enumerate(zip(ranked.tolist(), ranked_probs.tolist(), strict=True)):
            alternatives[r] = [(t, min(1.0, q * scale)) for t, q in zip(row, row_probs, strict=True)
                               if t != drawn[r]][:siblings]
    confidences = [min(1.0, q * scale) for q in chosen]
    if vocab is not None:  # columns -> token ids
        ids = vocab.id_list
        drawn = [ids[c] for c in drawn]
        alternatives = [[(ids[t], q) for t, q in alts] for alts in alternatives]
    return drawn, confidences, alternatives
