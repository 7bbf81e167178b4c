"""Proposers: each drafts a token tree continuing a request's tokens. One protocol, small classes.

`propose(context, k)` takes every token known so far (prompt + committed output) and returns a TokenTree of
at most k levels; it never changes the output, only how fast it is produced.
"""

from __future__ import annotations

from typing import Protocol

import torch

from specfleet.engine.kvcache import truncate
from specfleet.engine.tree import TokenTree


class Proposer(Protocol):
    name: str

    def propose(self, context: list[int], k: int) -> TokenTree: ...


class NoProposer:
    """Plain decoding through the same verification path: an empty tree every round."""

    name = "none"

    def propose(self, context: list[int], k: int) -> TokenTree:
        return TokenTree.empty()


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (longest n first) and
    propose the k tokens that followed it."""

    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, context: list[int], k: int) -> TokenTree:
        for n in range(min(self.max_n, len(context) - 1), self.min_n - 1, -1):
            suffix = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):  # latest match first, never the suffix itself
                if context[start:start + n] == suffix:
                    follow = context[start + n:start + n + k]
                    return TokenTree.chain(follow)
        return TokenTree.empty()


class ModelProposer:
    """A drafter model with its own KV cache, kept in step with the request's context between rounds."""

    def __init__(self, model, name: str = "model"):
        from transformers import DynamicCache

        self.model, self.name = model, name
        self.cache = DynamicCache()
        self.cached: list[int] = []  # tokens whose KV is in self.cache

    def _sync(self, context: list[int]) -> torch.Tensor:
        """Crops the cache to the longest common prefix with context; returns logits after the context."""
        common = 0
        for a, b in zip(self.cached, context[:-1], strict=False):  # keep >= 1 token to feed
            if a != b:
                break
            common += 1
        if common < len(self.cached):
            truncate(self.cache, common)
            self.cached = self.cached[:common]
        feed = torch.tensor([context[common:]], dtype=torch.long)
        out = self.model(input_ids=feed, past_key_values=self.cache, use_cache=True)
        self.cached = list(context)
        return out.logits[0, -1]

    @torch.no_grad()
    def propose(self, context: list[int], k: int) -> TokenTree:
        if k <= 0:
            return TokenTree.empty()
        logits = self._sync(context)
        tokens, probs = [], []
        for i in range(k):
            p = torch.softmax(logits.float(), dim=-1)
            tok = int(p.argmax())
            tokens.append(tok)
            probs.append(float(p[tok]))
            if i + 1 < k:
                out = self.model(input_ids=torch.tensor([[tok]]), past_key_values=self.cache, use_cache=True)
                self.cached.append(tok)
                logits = out.logits[0, -1]
        return TokenTree.chain(tokens, probs)
