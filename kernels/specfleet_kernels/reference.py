"""Torch reference kernels for token-tree verification: tree attention masks and positions, KV-cache
compaction, and greedy and sampled (lossless) tree acceptance. The GPU path must match these exactly.

A tree of n draft tokens is flat: `parents[i]` is the index of node i's parent, or -1 when node i hangs off
the last committed token (the root). Nodes are in topological order: parents[i] < i.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

ROOT = -1


def check_parents(parents: torch.Tensor) -> None:
    """Raises ValueError unless parents is a 1-D integer tensor in topological order."""
    parent_indices(parents)


def parent_indices(parents: torch.Tensor) -> list[int]:
    """parents as a list of ints; raises ValueError unless parents is a 1-D integer tensor in topological order.
    Checked in Python on the host: trees are small, and a few tensor ops per check cost more than the acceptance walks
    that need the list anyway."""
    if parents.dim() != 1 or parents.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"parents must be a 1-D integer tensor, got {tuple(parents.shape)} {parents.dtype}")
    parent_list = parents.tolist()
    if any(not ROOT <= p < i for i, p in enumerate(parent_list)):
        raise ValueError("parents must satisfy -1 <= parents[i] < i (topological order)")
    return parent_list


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    """[n] depth of each node: 0 for children of the root."""
    depth: list[int] = []
    for p in parent_indices(parents):  # on the host: a tensor op per node costs more than the list
        depth.append(0 if p == ROOT else depth[p] + 1)
    return torch.tensor(depth, dtype=torch.long, device=parents.device)


def tree_ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """[n, n] bool: mask[i, j] is True when node j is node i or one of its ancestors (what i may attend to)."""
    parent_list = parent_indices(parents)
    n = len(parent_list)
    # rows built on the host (a tensor op per node costs more than the whole list), one copy to the tensor
    rows: list[list[bool]] = []
    for i, p in enumerate(parent_list):
        row = rows[p].copy() if p != ROOT else [False] * n
        row[i] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool, device=parents.device).reshape(n, n)


def tree_attention_bias(parents: torch.Tensor, prefix_len: int, dtype=torch.float32) -> torch.Tensor:
    """[n, prefix_len + n] additive bias (0 visible, -inf hidden): every node sees the whole committed prefix
    and, among the draft nodes, only itself and its ancestors."""
    n = len(parents)
    visible = torch.ones(n, prefix_len + n, dtype=torch.bool, device=parents.device)
    visible[:, prefix_len:] = tree_ancestor_mask(parents)
    bias = torch.zeros(n, prefix_len + n, dtype=dtype, device=parents.device)
    return bias.masked_fill_(~visible, torch.finfo(dtype).min)


def tree_position_ids(parents: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """[n] position of each node: the prefix length plus its depth (siblings share a position)."""
    return prefix_len + tree_depths(parents)


def gather_kv(cache: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """KV compaction: cache [batch, heads, slots, dim] and keep [batch, m] slot indices -> [batch, heads, m, dim].

    After acceptance, keep = the committed slots followed by the accepted path's slots; nothing is recomputed.
    """
    b, h, _, d = cache.shape
    index = keep[:, None, :, None].expand(b, h, keep.shape[1], d)
    return cache.gather(2, index)


def greedy_accept(tokens: torch.Tensor, parents: torch.Tensor, target_argmax: torch.Tensor) -> tuple[list[int], int]:
    """Longest root-to-node path whose every token equals the target's greedy choice after its parent.

    target_argmax [n + 1]: the target's argmax after the root (index 0) and after each node i (index i + 1).
    Returns (accepted node indices in path order, the next token: the target's choice after the last accepted
    node, i.e. the correction or bonus token). Output equals plain greedy decoding by construction.
    """
    check_parents(parents)
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents.tolist()):
        children.setdefault(p, []).append(i)
    toks, choice = tokens.tolist(), target_argmax.tolist()
    path, node = [], ROOT
    while True:
        want = choice[node + 1]
        nxt = next((c for c in children.get(node, ()) if toks[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt


def sampled_tree_accept(tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor,
                        draft_probs: torch.Tensor | None, generator: torch.Generator) -> tuple[list[int], int]:
    """Lossless acceptance of a sampled draft tree: SpecInfer's multi-step speculative sampling, node by node.

    target_probs [n + 1, V]: the target's (warped) distribution after the root (index 0) and after each node i
    (index i + 1). draft_probs [n, V]: the distribution node i's token was drawn from, given its parent; None means
    deterministic nodes (one-hot drafts). At node u the children are tried in index order against a residual r,
    starting from the target's distribution: child c (token t, draft q) is accepted with probability
    min(1, r[t] / q[t]); on rejection r becomes normalize(max(r - q, 0)). When no child is accepted (or u has none)
    the next token is drawn from r. The output is distributed exactly as sampling from the target, provided each
    child was drawn independently from its own draft row (i.i.d. siblings, duplicates allowed) or is deterministic.

    A rejection that leaves r - q <= 0 everywhere has probability 0 in exact arithmetic (it needs r == q, where
    every draft token is accepted), so it can only come from rounding; r is then kept as it was, which stays inside
    the target's support. Arithmetic is float64 on the CPU (rows are moved lazily: pass CPU tensors to avoid one
    device sync per visited row). The generator (CPU) gives one uniform per child tried and one draw for the next
    token, so a seeded generator reproduces the result. Returns (accepted node indices in path order, next token).
    """
    parent_list = parent_indices(parents)
    n = len(parent_list)
    if target_probs.dim() != 2 or target_probs.shape[0] != n + 1:
        raise ValueError(f"target_probs must be [n + 1, vocab] = [{n + 1}, vocab], got {tuple(target_probs.shape)}")
    if draft_probs is not None and tuple(draft_probs.shape) != (n, target_probs.shape[1]):
        raise ValueError(f"draft_probs must be [n, vocab] = [{n}, {target_probs.shape[1]}], "
                         f"got {tuple(draft_probs.shape)}")
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parent_list):
        children.setdefault(p, []).append(i)
    toks = tokens.tolist()

    def distribution(row: torch.Tensor, what: str) -> torch.Tensor:
        row = row.to("cpu", torch.float64)  # [V]
        total = float(row.sum())
        if not total > 0 or not math.isfinite(total) or float(row.min()) < 0:
            raise ValueError(f"{what} is not a distribution (sum {total}, min {float(row.min())})")
        return row / total

    path, node = [], ROOT
    while True:
        residual = distribution(target_probs[node + 1], f"target_probs[{node + 1}]")  # [V]
        accepted = None
        for child in children.get(node, ()):
            token = toks[child]
            if draft_probs is None:
                draft = None
                q_token = 1.0
            else:
                draft = distribution(draft_probs[child], f"draft_probs[{child}]")  # [V]
                q_token = float(draft[token])
            uniform = float(torch.rand((), dtype=torch.float64, generator=generator))
            if uniform * q_token < float(residual[token]):  # probability min(1, r[t] / q[t])
                accepted = child
                break
            if draft is None:
                leftover = residual.clone()
                leftover[token] = 0.0
            else:
                leftover = (residual - draft).clamp_(min=0.0)
            total = float(leftover.sum())
            if total > 0:
                residual = leftover / total
        if accepted is None:
            return path, int(torch.multinomial(residual, 1, generator=generator))
        path.append(accepted)
        node = accepted


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio)


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function over uint64 counters (wrapping arithmetic, as the scalar one)."""
    x = x + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=128)
def _gumbels(seed: int, position: int, vocab: int) -> torch.Tensor:
    key = _splitmix64((_splitmix64(seed & _MASK64) + position * _GOLDEN) & _MASK64)
    with np.errstate(over="ignore"):
        bits = _splitmix64_array(np.uint64(key) + np.arange(vocab, dtype=np.uint64) * np.uint64(_GOLDEN))
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53  # in (0, 1): both logs finite
    return torch.from_numpy(-np.log(-np.log(uniform))).float()


def position_gumbels(seed: int, position: int, vocab: int) -> torch.Tensor:
    """[vocab] float32 standard Gumbel noise of a sampled request at output `position`: token t's value is a function
    of (seed, position, t) only (a SplitMix64 stream per position), never of the context, the draft, k, the batch or
    the replica. The target and every drafter read the same noise at the same position. Do not modify the result
    (it is cached)."""
    return _gumbels(int(seed), int(position), int(vocab))


def position_keyed_sample(probs: torch.Tensor, seeds: list[int], positions: list[int]) -> torch.Tensor:
    """probs [B, V] (rows need not be normalised) -> [B] int64 samples: row b's token is
    argmax_t(log probs[b, t] + G(seeds[b], positions[b])[t]), an exact draw from probs[b] (the Gumbel-max trick).

    Drafters draw sampled drafts this way with their own (warped) distribution q, and verification draws the target's
    token with p and the same noise, so a draft token equals the target's sample with probability at least
    (1 - TV(p, q)) / (1 + TV(p, q)) -- a coupling without communication (Daliri, Musco & Suresh, "Coupling without
    Communication and Drafter-Invariant Speculative Decoding", 2024) -- and the output stays a function of (seed,
    target) alone. Zero-probability tokens are never drawn."""
    probs = probs.float()
    rows, vocab = probs.shape
    if not len(seeds) == len(positions) == rows:
        raise ValueError(f"one seed and one position per row: {rows} rows, {len(seeds)} seeds, "
                         f"{len(positions)} positions")
    out = []
    for b in range(rows):  # rows by index: iterating a tensor (unbind) costs more than the draw itself
        row = probs[b]  # [V]
        noise = position_gumbels(seeds[b], positions[b], vocab).to(row.device)
        support = row.nonzero()[:, 0]  # ascending, so argmax keeps the full-vocabulary version's first-max rule
        if 0 < support.shape[0] <= vocab // 4:  # a warped (top-p / top-k) row: the logarithm of its support only
            out.append(support[(torch.log(row[support]) + noise[support]).argmax()])
        else:  # -inf off the support
            out.append((torch.log(row) + noise).argmax())
    return torch.stack(out) if out else torch.empty(0, dtype=torch.long, device=probs.device)


def position_keyed_accept(tokens: torch.Tensor, parents: torch.Tensor, target_probs: torch.Tensor, seed: int,
                          start: int) -> tuple[list[int], int]:
    """Lossless, reproducible acceptance of a draft tree for a sampled request.

    The token at output position start + d is the target's own sample there, drawn with the position's Gumbel noise
    (position_keyed_sample of target_probs at the current node). A child holding that token is accepted and the walk
    goes on below it; otherwise the sample is the round's next token. This is ancestral sampling from the target
    with noise keyed by (seed, position), so the output is a function of (seed, target) only: equal seeds give equal
    text for every proposer, tree shape, batch size and replica, and a replayed round reproduces exactly. Drafts
    may be deterministic (argmax, suffix trees: accepted with probability p[t]) or sampled with the same noise from
    the drafter's q (position_keyed_sample), which makes them agree with the target far more often (see there).
    target_probs [n + 1, V] as in sampled_tree_accept. Returns (accepted node indices in path order, next token).
    """
    return keyed_walk(tokens, parents, lambda node, depth: int(
        position_keyed_sample(target_probs[node + 1][None], [seed], [start + depth])[0]))


def keyed_walk(tokens: torch.Tensor, parents: torch.Tensor, sample) -> tuple[list[int], int]:
    """The acceptance walk of position-keyed sampling: from the root, `sample(node, depth)` is the target's token
    after `node` (-1: the root) at `depth` tokens into the round; a child holding it is accepted and the walk goes on
    below it, else that token is the round's next one. Returns (accepted node indices in path order, next token)."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents.tolist()):
        children.setdefault(p, []).append(i)
    toks = tokens.tolist()
    path, node = [], -1
    while True:
        token = sample(node, len(path))
        child = next((c for c in children.get(node, ()) if toks[c] == token), None)
        if child is None:
            return path, token
        path.append(child)
        node = child
