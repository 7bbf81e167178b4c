"""The target side of a round, shared by the in-process engine and the verifier service: per-request slot KV caches
kept in step with each request's tokens (rebuilt from the tokens when missing or stale), one forward over a batch
of token trees, lossless acceptance, and KV compaction to the accepted path."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specfleet.engine.llama import NEG, KvLimits, LlamaRunner, causal_bias, common_prefix
from specfleet.engine.sampling import SamplingParams, argmax, keyed_tree_accept, warp_probs
from specfleet.engine.tree import TokenTree
from specfleet_kernels.reference import (
    greedy_accept,
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


class FeatureRows:
    """One request's target features (the last hidden state after the final norm, row i for token i) of the tokens
    whose KV is cached, in a buffer grown by doubling: what a draft head reads."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.buf = torch.empty(64, width, dtype=dtype, device=device)  # on the target's device
        self.n = 0

    def truncate(self, n: int) -> None:
        self.n = min(self.n, n)

    def extend(self, rows: torch.Tensor) -> None:
        need = self.n + len(rows)
        if need > len(self.buf):
            grown = torch.empty(max(need, 2 * len(self.buf)), self.buf.shape[1], dtype=self.buf.dtype,
                                device=self.buf.device)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        self.buf[self.n:need] = rows
        self.n = need

    def view(self) -> torch.Tensor:
        return self.buf[:self.n]


FOLD_MAX = 32  # context tokens missing from a request's cache fed in the verify forward itself; more: a prefill


class TargetVerifier:
    def __init__(self, target, slots: int, limits: KvLimits | None = None, features: bool = False):
        """features: keep each request's target features (`features_of`) for a draft head."""
        self.runner = LlamaRunner(target, slots=slots, limits=limits)
        self.keep_features = features
        self.feats: dict[str, FeatureRows] = {}
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

    def sync(self, rid: str, context: list[int]) -> int:
        """Makes the slot's cached tokens a prefix of context[:-1] (the longest cached prefix is kept) and returns how
        many of context's last tokens the verify forward feeds before the tree: 1 when in step (every round on the
        verifier that did the last one), a few when the request's last rounds were verified elsewhere (the stream
        queue, DSI) — they ride in the same forward — or, for longer gaps, 1 after a prefill of its own."""
        if rid not in self.slot_of:
            if self.free_slots <= 0:
                raise RuntimeError(f"no free KV slot for request {rid!r} ({self.runner.slots} in use)")
            self.slot_of[rid] = len(self.slot_of)  # live slots stay packed at 0..n-1
            self.known[rid] = []
            if self.keep_features:
                self.feats[rid] = FeatureRows(self.runner.config.hidden_size, self.runner.dtype, self.runner.device)
        known, want = self.known[rid], context[:-1]
        common = common_prefix(known, want)
        if common == len(known) == len(want):
            return 1  # in step already
        if 0 < common and len(context) - common <= FOLD_MAX:
            self.known[rid] = known[:common]  # columns past it are overwritten by this forward
            if self.keep_features:
                self.feats[rid].truncate(common)
            return len(context) - common
        if common < len(want):
            n = len(want) - common
            dev = self.runner.device
            cols = torch.arange(common, len(want), device=dev)[None]  # [1, n]
            out = self.runner.forward(torch.tensor([want[common:]], device=dev), cols, cols,
                                      causal_bias([common], [n], len(want), dev),
                                      logits_at=torch.tensor([[n - 1]], device=dev),
                                      slots=torch.tensor([self.slot_of[rid]], device=dev),
                                      return_hidden=self.keep_features)
            if self.keep_features:
                self.feats[rid].truncate(common)
                self.feats[rid].extend(out[1][0])
        self.known[rid] = list(want)
        return 1

    def release(self, rid: str) -> None:
        """Frees a request's slot; the request in the last slot moves into it so live slots stay packed."""
        slot = self.slot_of.pop(rid, None)
        if slot is None:
            return
        del self.known[rid]
        self.feats.pop(rid, None)
        last = next((r for r, s in self.slot_of.items() if s == len(self.slot_of)), None)
        if last is not None:
            self.runner.move_slot(self.slot_of[last], slot, len(self.known[last]))
            self.slot_of[last] = slot

    def verify(self, items: list[VerifyItem]) -> list[Verdict]:
        """One target forward over every item's last token + tree; accepts; compacts each slot's KV."""
        if len({item.rid for item in items}) != len(items):
            raise ValueError("two rounds of one request in one forward would share its KV slot; verify them in turn")
        fed = [self.sync(item.rid, item.context) for item in items]
        # rows in slot order: when every live request is in the batch the runner reads a view of slots 0..B-1
        order = sorted(range(len(items)), key=lambda i: self.slot_of[items[i].rid])
        items, fed = [items[i] for i in order], [fed[i] for i in order]
        logits = self._forward(items, fed)  # [sum of rows' tokens, V]: each row's fed tokens then its tree, packed
        hidden = None
        if self.keep_features:
            logits, hidden = logits
        verdicts: list[Verdict] = []
        choices, host = self._to_host(items, fed, logits)
        start = 0  # the row's first token in the packed outputs
        feature_rows: list[int] = []  # packed output rows whose features the requests keep, in row order
        feature_counts: list[int] = []
        for item, m in zip(items, fed, strict=True):
            tree, n = item.tree, len(item.tree)
            if item.params.greedy:
                # the argmax after the last context token, then after each node
                path, nxt = greedy_accept(tree.tokens, tree.parents, choices[start + m - 1:start + m + n])
            elif tree.draft_probs is None:  # drafts keyed by the position's noise, or deterministic: the target's
                # own keyed sample at each node the walk visits, from its logit rows [n + 1, V] on the host
                path, nxt = keyed_tree_accept(tree.tokens, tree.parents, host[item.rid], item.params, item.seed,
                                              item.output_position)
            else:
                path, nxt = sampled_tree_accept(tree.tokens, tree.parents, warp_probs(host[item.rid], item.params),
                                                tree.draft_probs, item.generator)
            cached = len(self.known[item.rid])
            # KV of the fed context tokens stays at columns cached..cached+m-1; the accepted nodes' KV moves after it
            self.runner.keep(self.slot_of[item.rid], cached + m, [cached + m + p for p in path])
            accepted = tree.tokens[path].tolist()
            self.known[item.rid] += item.context[len(item.context) - m:] + accepted
            if hidden is not None:  # the fed context tokens' features, then the accepted nodes'
                feature_rows += [start + i for i in range(m)] + [start + m + p for p in path]
                feature_counts.append(m + len(path))
            verdicts.append(Verdict(path, accepted + [nxt]))
            start += m + n
        if hidden is not None:
            # one gather for the whole batch, then a slice per request: an index tensor and a gather per request
            # cost ~5% of a round at batch 16 where every row keeps one feature (a round nobody drafts in)
            kept = hidden.index_select(0, torch.tensor(feature_rows, device=hidden.device))
            for item, rows in zip(items, kept.split(feature_counts), strict=True):
                self.feats[item.rid].extend(rows)
        restored: list[Verdict] = [None] * len(items)  # type: ignore[list-item]
        for row, original in enumerate(order):
            restored[original] = verdicts[row]
        return restored

    @staticmethod
    def _to_host(items: list[VerifyItem], fed: list[int], logits: torch.Tensor):
        """What acceptance reads, on the host in one copy each per round (never a device sync per node): every
        row's argmax when some item is greedy, and the logit rows of the sampled items ({rid: [n + 1, V]})."""
        choices = argmax(logits).cpu() if any(item.params.greedy for item in items) else None
        spans, start = {}, 0
        for item, m in zip(items, fed, strict=True):
            if not item.params.greedy:
                spans[item.rid] = (start + m - 1, start + m + len(item.tree))
            start += m + len(item.tree)
        if not spans:
            return choices, {}
        if logits.device.type == "cpu":
            return choices, {rid: logits[a:b] for rid, (a, b) in spans.items()}
        index = torch.cat([torch.arange(a, b, device="cpu") for a, b in spans.values()])
        picked = logits.index_select(0, index.to(logits.device)).cpu()
        host, at = {}, 0
        for rid, (a, b) in spans.items():
            host[rid] = picked[at:at + b - a]
            at += b - a
        return choices, host

    def _forward(self, items: list[VerifyItem], fed: list[int]) -> torch.Tensor:
        b = len(items)
        t = max(m + len(it.tree) for it, m in zip(items, fed, strict=True))
        cached = [len(self.known[it.rid]) for it in items]
        width = max(cached) + t
        slots = [self.slot_of[it.rid] for it in items]
        # built on the host (trees live there), moved to the model's device by the runner: one copy each
        tokens = torch.zeros(b, t, dtype=torch.long, device="cpu")
        positions = torch.zeros(b, t, dtype=torch.long, device="cpu")
        bias = torch.full((b, 1, t, width), NEG, device="cpu")
        cols = torch.tensor(cached, device="cpu")[:, None] + torch.arange(t, device="cpu")[None]  # [B, T]
        for r, (item, p, m) in enumerate(zip(items, cached, fed, strict=True)):
            tree = item.tree
            n = len(tree) + m
            # nodes 0..m-1 are the fed context tokens, a chain ending in the last committed token; draft roots hang
            # off that one
            parents = torch.cat([torch.arange(-1, m - 1, device="cpu"),
                                 torch.where(tree.parents < 0, m - 1, tree.parents + m)])
            tokens[r, :m] = torch.tensor(item.context[len(item.context) - m:], device="cpu")
            tokens[r, m:n] = tree.tokens
            positions[r, :n] = p + tree_depths(parents)
            positions[r, n:] = p
            bias[r, 0, :n, :p] = 0.0
            bias[r, 0, :n, p:p + n] = torch.where(tree_ancestor_mask(parents), 0.0, NEG)
            bias[r, 0, n:, 0] = 0.0  # padding rows see one column (never an all-hidden row)
        packed = slots == list(range(b))  # rows are slots 0..B-1: the runner reads a view, no copy
        # rows of unequal length (a tree beside plain rows): the runner skips the padding, so a probe's few nodes
        # cost their own tokens, not T for every row of the batch
        return self.runner.forward(tokens, positions, cols, bias,
                                   slots=None if packed else torch.tensor(slots, device="cpu"),
                                   return_hidden=self.keep_features,
                                   lengths=[m + len(it.tree) for it, m in zip(items, fed, strict=True)])

    def features_of(self, rid: str) -> torch.Tensor:
        """[len(cached tokens), hidden]: the target's features of the request's tokens but the last (needs
        features=True)."""
        return self.feats[rid].view()
