"""CoSine's confidence-based token fusion: per position the most confident drafter token wins and is fed back,
the losers stay as extra branches of one token tree; plus `merge_trees`, a prefix-deduplicated union of trees."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from specfleet.engine.tree import TokenTree

Candidate = tuple[int, float]  # (token, confidence) proposed by one drafter; list index = drafter index


def _combine(candidates: Sequence[Candidate]) -> list[tuple[int, float, tuple[int, ...]]]:
    """Distinct tokens as (token, confidence, drafter indices), best first.

    Several drafters proposing the same token combine as the MAX of their confidences, not the sum: confidences
    are each drafter's own probability, so a sum is no probability and would let two weak, correlated drafters
    outvote one confident drafter. Ties go to the token whose best confidence came from the lowest drafter index.
    """
    best: dict[int, float] = {}
    first_best: dict[int, int] = {}  # drafter index that first reached the token's best confidence
    sources: dict[int, list[int]] = {}
    for index, (token, confidence) in enumerate(candidates):
        token, confidence = int(token), float(confidence)
        if math.isnan(confidence):
            raise ValueError(f"drafter {index} proposed token {token} with a NaN confidence")
        sources.setdefault(token, []).append(index)
        if token not in best or confidence > best[token]:
            best[token], first_best[token] = confidence, index
    ranked = sorted(best, key=lambda token: (-best[token], first_best[token]))
    return [(token, best[token], tuple(sources[token])) for token in ranked]


def fuse_step(candidates: list[Candidate]) -> tuple[int, float, list[Candidate]]:
    """One fusion position: (winner token, its confidence, losers).

    candidates[i] is drafter i's top token and confidence given the fused prefix. The winner is the most confident
    token (same token from several drafters: max confidence; ties: lower drafter index). Losers are the other
    distinct tokens with their best confidence, sorted by confidence descending (ties: lower drafter index).
    """
    if not candidates:
        raise ValueError("fuse_step needs at least one candidate")
    ranked = _combine(candidates)
    (winner, confidence, _), losers = ranked[0], ranked[1:]
    return winner, confidence, [(token, conf) for token, conf, _ in losers]


class FusedTreeBuilder:
    """Builds the fused tree level by level while drafting: `add_level` returns the token to feed back to every
    drafter; the winners form the trunk and each level's kept losers hang off the same parent as its winner.

    Within a level the winner is the first sibling (acceptance tries siblings in index order), then the losers by
    confidence. At most `max_branches_per_level` losers are kept per level, and only those with a confidence of at
    least `min_branch_confidence`, to keep the verified tree small.
    """

    def __init__(self, max_branches_per_level: int = 2, min_branch_confidence: float = 0.05):
        if max_branches_per_level < 0:
            raise ValueError("max_branches_per_level must be >= 0")
        self.max_branches_per_level = max_branches_per_level
        self.min_branch_confidence = min_branch_confidence
        self._tokens: list[int] = []
        self._parents: list[int] = []
        self._probs: list[float] = []
        self._sources: list[tuple[int, ...]] = []
        self._trunk_nodes: list[int] = []

    def add_level(self, candidates: list[Candidate]) -> int:
        """Fuses one position's candidates (candidates[i] from drafter i) and returns the winning token."""
        if not candidates:
            raise ValueError("add_level needs at least one candidate; stop drafting instead")
        ranked = _combine(candidates)
        parent = self._trunk_nodes[-1] if self._trunk_nodes else -1
        winner, confidence, sources = ranked[0]
        self._trunk_nodes.append(self._append(winner, confidence, parent, sources))
        kept = [loser for loser in ranked[1:] if loser[1] >= self.min_branch_confidence]
        for token, conf, loser_sources in kept[:self.max_branches_per_level]:
            self._append(token, conf, parent, loser_sources)
        return winner

    def _append(self, token: int, prob: float, parent: int, sources: tuple[int, ...]) -> int:
        self._tokens.append(token)
        self._parents.append(parent)
        self._probs.append(prob)
        self._sources.append(sources)
        return len(self._tokens) - 1

    @property
    def trunk(self) -> list[int]:
        """The fused tokens so far (what the drafters were fed), one per level."""
        return [self._tokens[i] for i in self._trunk_nodes]

    @property
    def sources(self) -> list[tuple[int, ...]]:
        """Per node of `build()`'s tree: the indices of the drafters that proposed its token (for crediting
        drafters whose tokens end up on the accepted path)."""
        return list(self._sources)

    def __len__(self) -> int:
        return len(self._tokens)

    def build(self) -> TokenTree:
        """The fused tree (deterministic nodes: draft_probs None; probs = fused confidences)."""
        return TokenTree(
            torch.tensor(self._tokens, dtype=torch.long, device="cpu"),
            torch.tensor(self._parents, dtype=torch.long, device="cpu"),
            torch.tensor(self._probs, dtype=torch.float32, device="cpu"),
        )


def fuse(levels: list[list[Candidate]], max_branches_per_level: int = 2,
         min_branch_confidence: float = 0.05) -> TokenTree:
    """The fused tree of precomputed levels (levels[j][i] = drafter i's candidate at depth j)."""
    builder = FusedTreeBuilder(max_branches_per_level, min_branch_confidence)
    for candidates in levels:
        builder.add_level(candidates)
    return builder.build()


def merge_trees_with_origins(trees: list[TokenTree]) -> tuple[TokenTree, list[list[tuple[int, int]]]]:
    """`merge_trees`, and per merged node the (tree index, node index) pairs of the input nodes it stands for."""
    if any(tree.draft_probs is not None for tree in trees):
        # A merged node would need one proposal distribution, and sampled drafts from different distributions
        # cannot share one without breaking lossless acceptance.
        raise ValueError("merge_trees merges deterministic trees only (draft_probs None)")
    node_of: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node, creation order
    parent_of: list[int] = []
    token_of: list[int] = []
    prob_of: list[float] = []
    origins: list[list[tuple[int, int]]] = []
    for t, tree in enumerate(trees):
        merged_ids: list[int] = []
        for i, (token, parent, prob) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist(),
                                                      tree.probs.tolist(), strict=True)):
            merged_parent = -1 if parent < 0 else merged_ids[parent]
            key = (merged_parent, token)
            node = node_of.get(key)
            if node is None:
                node = node_of[key] = len(token_of)
                parent_of.append(merged_parent)
                token_of.append(token)
                prob_of.append(prob)
                origins.append([])
            else:
                prob_of[node] = max(prob_of[node], prob)
            origins[node].append((t, i))
            merged_ids.append(node)

    children: dict[int, list[int]] = {}
    for node, parent in enumerate(parent_of):
        children.setdefault(parent, []).append(node)
    # Breadth first from the root, siblings by prob descending (stable: creation order breaks ties): topological,
    # and each parent's children stay contiguous in the order acceptance should try them.
    order: list[int] = []
    frontier = [-1]
    while frontier:
        next_frontier = []
        for parent in frontier:
            kids = sorted(children.get(parent, []), key=lambda n: -prob_of[n])
            order.extend(kids)
            next_frontier.extend(kids)
        frontier = next_frontier
    new_index = {old: new for new, old in enumerate(order)}
    tree = TokenTree(
        torch.tensor([token_of[n] for n in order], dtype=torch.long, device="cpu"),
        torch.tensor([-1 if parent_of[n] < 0 else new_index[parent_of[n]] for n in order], dtype=torch.long,
                     device="cpu"),
        torch.tensor([prob_of[n] for n in order], dtype=torch.float32, device="cpu"),
    )
    return tree, [origins[n] for n in order]


def merge_trees(trees: list[TokenTree]) -> TokenTree:
    """Union of several proposers' trees: one node per distinct root-to-node token path (prob = the max over
    the trees), children ordered by prob descending, topological order."""
    return merge_trees_with_origins(trees)[0]
