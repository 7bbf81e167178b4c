"""Token trees as flat tensors: `tokens`, `parents` (-1 = child of the last committed token), `depth`, `probs`,
and, for sampled drafts, `draft_probs` (the distribution each node's token was drawn from).

A tree is a host-side structure: its tensors live on the CPU whatever device the models run on (a few dozen nodes,
read node by node in Python and shipped over gRPC); the verifier copies what its forward needs to the model's device
once per round."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specfleet_kernels.reference import check_parents, tree_depths


@dataclass(frozen=True)
class TokenTree:
    """A draft tree in topological order (parents[i] < i). Siblings are tried in index order on acceptance."""

    tokens: torch.Tensor  # [n] int64
    parents: torch.Tensor  # [n] int64, -1 for children of the root
    probs: torch.Tensor  # [n] float32, the proposer's confidence in each token (its probability)
    # [n, vocab] float32 or None: the distribution node i's token was *sampled* from (given its parent). None means
    # every node is deterministic (argmax, lookup, fusion), which lossless acceptance treats as a one-hot draft.
    draft_probs: torch.Tensor | None = None
    # Optional, per node: names of the proposers that proposed it (credits drafters for speculation control).
    origins: tuple[tuple[str, ...], ...] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> torch.Tensor:
        """[n] depth of each node, 0 for children of the root."""
        return tree_depths(self.parents)

    @property
    def max_depth(self) -> int:
        """Levels in the tree (0 when empty). On the parents as a Python list: a round's tree has a few dozen nodes at
        most, and `depth` costs a tensor op per node (the router asks this several times a round)."""
        depth: list[int] = []
        for i, p in enumerate(self.parents.tolist()):
            if not -1 <= p < i:
                raise ValueError("parents must satisfy -1 <= parents[i] < i (topological order)")
            depth.append(0 if p == -1 else depth[p] + 1)
        return max(depth) + 1 if depth else 0

    def validate(self) -> None:
        """Raises ValueError on a malformed tree (shapes, order)."""
        n = len(self.tokens)
        if self.tokens.dim() != 1 or self.probs.shape != (n,) or self.parents.shape != (n,):
            raise ValueError(f"tree arrays disagree: tokens {tuple(self.tokens.shape)}, parents "
                             f"{tuple(self.parents.shape)}, probs {tuple(self.probs.shape)}")
        check_parents(self.parents)
        if self.draft_probs is not None and (self.draft_probs.dim() != 2 or self.draft_probs.shape[0] != n):
            raise ValueError(f"draft_probs must be [n, vocab], got {tuple(self.draft_probs.shape)}")

    @staticmethod
    def empty() -> TokenTree:
        return TokenTree(torch.empty(0, dtype=torch.long, device="cpu"), torch.empty(0, dtype=torch.long, device="cpu"),
                         torch.empty(0, device="cpu"))

    @staticmethod
    def chain(tokens: list[int], probs: list[float] | None = None,
              draft_probs: torch.Tensor | None = None) -> TokenTree:
        """A single draft: each token the child of the one before."""
        n = len(tokens)
        return TokenTree(
            torch.tensor(tokens, dtype=torch.long, device="cpu"),
            torch.arange(-1, n - 1, dtype=torch.long, device="cpu"),
            torch.tensor(probs if probs is not None else [1.0] * n, dtype=torch.float32, device="cpu"),
            draft_probs,
        )

    def best_path(self) -> list[int]:
        """Node indices of the most confident chain: the first child at every level (siblings are in confidence
        order), i.e. the continuation a pipelined drafter speculates on."""
        path: list[int] = []
        parent = -1
        for i in range(len(self)):
            if int(self.parents[i]) == parent:
                path.append(i)
                parent = i
        return path

    def subtree(self, node: int) -> TokenTree:
        """The descendants of `node`, re-rooted (its children become roots): the draft left once `node`'s token
        has been committed."""
        keep: list[int] = []
        index = {node: -1}
        for i in range(node + 1, len(self)):
            p = int(self.parents[i])
            if p in index:
                index[i] = len(keep)
                keep.append(i)
        return self._select(keep, [index[int(self.parents[i])] for i in keep])

    def prune_depth(self, k: int) -> TokenTree:
        """The nodes less than k levels deep (a draft of at most k levels)."""
        if self.max_depth <= k:
            return self
        keep = [i for i, d in enumerate(self.depth.tolist()) if d < k]
        index = {old: new for new, old in enumerate(keep)}
        return self._select(keep, [index.get(int(self.parents[i]), -1) for i in keep])

    def _select(self, keep: list[int], parents: list[int]) -> TokenTree:
        return TokenTree(self.tokens[keep], torch.tensor(parents, dtype=torch.long, device="cpu"), self.probs[keep],
                         None if self.draft_probs is None else self.draft_probs[keep],
                         None if self.origins is None else tuple(self.origins[i] for i in keep))
