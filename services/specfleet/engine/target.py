"""Runs the target: verifies a token tree in one forward pass over its KV cache, accepts greedily and keeps
only the accepted path's KV (compaction by gather, no recompute)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specfleet.engine.kvcache import compact
from specfleet.engine.tree import TokenTree
from specfleet_kernels.reference import greedy_accept, tree_attention_bias, tree_position_ids


@dataclass
class RequestState:
    """One request on the target: KV for every committed token but the last (`pending`, fed next round)."""

    cache: object
    cached_len: int
    pending: int
    stats: dict = field(default_factory=lambda: {"rounds": 0, "draft_tokens": 0, "accepted_tokens": 0})


class TargetRunner:
    def __init__(self, model):
        from transformers import DynamicCache

        self.model = model
        self._cache_cls = DynamicCache

    @torch.no_grad()
    def start(self, prompt_ids: list[int]) -> RequestState:
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        cache = self._cache_cls()
        if len(prompt_ids) > 1:
            self.model(input_ids=torch.tensor([prompt_ids[:-1]]), past_key_values=cache, use_cache=True)
        return RequestState(cache=cache, cached_len=len(prompt_ids) - 1, pending=prompt_ids[-1])

    @torch.no_grad()
    def verify(self, state: RequestState, tree: TokenTree) -> list[int]:
        """One round: returns the committed tokens (accepted drafts, then the target's own token)."""
        n = len(tree)
        # Node 0 is the pending token; draft roots hang off it.
        parents = torch.cat([torch.tensor([-1]), torch.where(tree.parents < 0, 0, tree.parents + 1)])
        tokens = torch.cat([torch.tensor([state.pending]), tree.tokens])
        p = state.cached_len
        bias = tree_attention_bias(parents, p)[None, None]  # [1, 1, n + 1, p + n + 1]
        out = self.model(input_ids=tokens[None], past_key_values=state.cache, use_cache=True,
                         position_ids=tree_position_ids(parents, p)[None], attention_mask=bias)
        argmax = out.logits[0].argmax(-1)  # [n + 1]: the target's choice after pending and after each node
        path, nxt = greedy_accept(tree.tokens, tree.parents, argmax)
        compact(state.cache, torch.tensor([list(range(p + 1)) + [p + 1 + i for i in path]]))
        accepted = tree.tokens[path].tolist()
        state.cached_len = p + 1 + len(path)
        state.pending = nxt
        state.stats["rounds"] += 1
        state.stats["draft_tokens"] += n
        state.stats["accepted_tokens"] += len(path)
        return accepted + [nxt]


def generate_greedy(runner: TargetRunner, proposer, prompt_ids: list[int], max_new_tokens: int,
                    k: int = 4) -> tuple[list[int], dict]:
    """Greedy speculative decoding; the output equals the target's own greedy decoding."""
    state = runner.start(prompt_ids)
    out: list[int] = []
    while len(out) < max_new_tokens:
        tree = proposer.propose(prompt_ids + out, min(k, max_new_tokens - len(out) - 1))
        out.extend(runner.verify(state, tree))
    stats = dict(state.stats)
    stats["accepted_per_round"] = stats["accepted_tokens"] / max(1, stats["rounds"])
    return out[:max_new_tokens], stats
