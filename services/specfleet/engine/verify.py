"""The target side of a round, shared by the in-process engine and the verifier service: per-request slot KV caches
kept in step with each request's tokens (rebuilt from the tokens when missing or stale), one forward over a batch
of token trees, lossless acceptance, and KV compaction to the accepted path."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specfleet.engine.llama import NEG, LlamaRunner, causal_bias, common_prefix
from specfleet.engine.sampling import SamplingParams, warp_probs
from specfleet.engine.tree import TokenTree
from specfleet_kernels.reference import (
    greedy_accept,
    position_keyed_accept,
    sampled_tree_accept,
    tree_ancestor_mask,
    tree_depths,
)


def cut_at_finish(tokens: list[int], remaining: int, eos_token_id: int | None,
                  ignore_eos: bool = False) -> tuple[list[int], str]:
    """A round's committed tokens cut where the request ends: at `remaining` tokens ("length") or just after the
    end-of-text token ("stop"). Returns (tokens to commit, finish reason or "" while it goes on)."""
    tokens = tokens[:remaining]
    if not ignore_eos and eos_token_id in tokens:
        return tokens[:tokens.index(eos_token_id) + 1], "stop"
    return tokens, "length" if len(tokens) >= remaining else ""


@dataclass
class VerifyItem:
    rid: str
    context: list[int]  # prompt + committed output; its last token is fed with the tree
    tree: TokenTree
    params: SamplingParams
    output_position: int = 0  # index of the next output token (keys the sampling stream)
    seed: int | None = None  # sampled requests: the request's stream
    generator: torch.Generator | None = None  # sampled trees with draft_probs use a generator


@dataclass
class Verdict:
    path: list[int]  # accepted node indices, root to leaf
    tokens: list[int]  # accepted draft tokens followed by the target's own next token


class TargetVerifier:
    def __init__(self, target, slots: int):
        self.runner = LlamaRunner(target, slots=slots)
        self.vocab_size = self.runner.vocab_size
        self.max_positions = self.runner.max_positions
        self.slot_of: dict[str, int] = {}
        self.known: dict[str, list[int]] = {}  # rid -> tokens whose KV is in its slot (columns 0..len-1)

    def __contains__(self, rid: str) -> bool:
        return rid in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    @property
    def free_slots(self) -> int:
        return self.runner.slots - len(self.slot_of)

    def sync(self, rid: str, context: list[int]) -> None:
        """Makes the slot hold KV for context[:-1]: reuses the longest cached prefix, prefills the rest."""
        if rid not in self.slot_of:
            if self.free_slots <= 0:
                raise RuntimeError(f"no free KV slot for request {rid!r} ({self.runner.slots} in use)")
            self.slot_of[rid] = len(self.slot_of)  # live slots stay packed at 0..n-1
            self.known[rid] = []
        known, want = self.known[rid], context[:-1]
        common = common_prefix(known, want)
        if common == len(known) == len(want):
            return  # in step already (every round but a request's first)
        if common < len(want):
            n = len(want) - common
            cols = torch.arange(common, len(want))[None]  # [1, n]
            self.runner.forward(torch.tensor([want[common:]]), cols, cols, causal_bias([common], [n], len(want)),
                                logits_at=torch.tensor([[n - 1]]), slots=torch.tensor([self.slot_of[rid]]))
        self.known[rid] = list(want)

    def release(self, rid: str) -> None:
        """Frees a request's slot; the request in the last slot moves into it so live slots stay packed."""
        slot = self.slot_of.pop(rid, None)
        if slot is None:
            return
        del self.known[rid]
        last = next((r for r, s in self.slot_of.items() if s == len(self.slot_of)), None)
        if last is not None:
            self.runner.move_slot(self.slot_of[last], slot, len(self.known[last]))
            self.slot_of[last] = slot

    def verify(self, items: list[VerifyItem]) -> list[Verdict]:
        """One target forward over every item's last token + tree; accepts; compacts each slot's KV."""
        if len({item.rid for item in items}) != len(items):
            raise ValueError("two rounds of one request in one forward would share its KV slot; verify them in turn")
        for item in items:
            self.sync(item.rid, item.context)
        # rows in slot order: when every live request is in the batch the runner reads a view of slots 0..B-1
        order = sorted(range(len(items)), key=lambda i: self.slot_of[items[i].rid])
        items = [items[i] for i in order]
        logits = self._forward(items)  # [B, T, V]
        verdicts: list[Verdict] = []
        for b, item in enumerate(items):
            tree, n = item.tree, len(item.tree)
            if item.params.greedy:
                path, nxt = greedy_accept(tree.tokens, tree.parents, logits[b, :n + 1].argmax(-1))
            else:
                probs = warp_probs(logits[b, :n + 1], item.params)  # [n + 1, V]
                if tree.draft_probs is None:  # deterministic drafts: the sample cannot depend on what was drafted
                    path, nxt = position_keyed_accept(tree.tokens, tree.parents, probs, item.seed,
                                                      item.output_position)
                else:
                    path, nxt = sampled_tree_accept(tree.tokens, tree.parents, probs, tree.draft_probs,
                                                    item.generator)
            cached = len(self.known[item.rid])
            # KV of the fed token stays at column `cached`; the accepted nodes' KV moves right after it
            self.runner.keep(self.slot_of[item.rid], cached + 1, cached + 1 + torch.tensor(path, dtype=torch.long))
            accepted = tree.tokens[path].tolist()
            self.known[item.rid] += [item.context[-1]] + accepted
            verdicts.append(Verdict(path, accepted + [nxt]))
        restored: list[Verdict] = [None] * len(items)  # type: ignore[list-item]
        for row, original in enumerate(order):
            restored[original] = verdicts[row]
        return restored

    def _forward(self, items: list[VerifyItem]) -> torch.Tensor:
        b = len(items)
        t = 1 + max(len(it.tree) for it in items)
        cached = [len(self.known[it.rid]) for it in items]
        width = max(cached) + t
        slots = [self.slot_of[it.rid] for it in items]
        tokens = torch.zeros(b, t, dtype=torch.long)
        positions = torch.zeros(b, t, dtype=torch.long)
        bias = torch.full((b, 1, t, width), NEG)
        cols = torch.tensor(cached)[:, None] + torch.arange(t)[None]  # [B, T]
        for r, (item, p) in enumerate(zip(items, cached, strict=True)):
            tree = item.tree
            n = len(tree) + 1
            # node 0 is the fed (last committed) token; draft roots hang off it
            parents = torch.cat([torch.tensor([-1]), torch.where(tree.parents < 0, 0, tree.parents + 1)])
            tokens[r, 0] = item.context[-1]
            tokens[r, 1:n] = tree.tokens
            positions[r, :n] = p + tree_depths(parents)
            positions[r, n:] = p
            bias[r, 0, :n, :p] = 0.0
            bias[r, 0, :n, p:p + n] = torch.where(tree_ancestor_mask(parents), 0.0, NEG)
            bias[r, 0, n:, 0] = 0.0  # padding rows see one column (never an all-hidden row)
        packed = slots == list(range(b))  # rows are slots 0..B-1: the runner reads a view, no copy
        return self.runner.forward(tokens, positions, cols, bias, slots=None if packed else torch.tensor(slots))
