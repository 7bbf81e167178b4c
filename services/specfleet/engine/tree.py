"""Token trees as flat tensors: `tokens`, `parents` (-1 = child of the last committed token), `probs`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenTree:
    """A draft tree in topological order (parents[i] < i)."""

    tokens: torch.Tensor  # [n] int64
    parents: torch.Tensor  # [n] int64, -1 for children of the root
    probs: torch.Tensor  # [n] float32, the proposer's probability of each token

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def empty() -> TokenTree:
        return TokenTree(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.empty(0))

    @staticmethod
    def chain(tokens: list[int], probs: list[float] | None = None) -> TokenTree:
        """A single draft: each token the child of the one before."""
        n = len(tokens)
        return TokenTree(
            torch.tensor(tokens, dtype=torch.long),
            torch.arange(-1, n - 1, dtype=torch.long),
            torch.tensor(probs if probs is not None else [1.0] * n, dtype=torch.float32),
        )
