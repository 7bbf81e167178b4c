"""Model drafters: one or several small Llama models, each with its own slot KV cache, drafting a batch of
requests position by position. With several drafters, CoSine's confidence fusion picks each position's token,
feeds it back to every drafter and keeps the losers as branches (`fusion.FusedTreeBuilder`)."""

from __future__ import annotations

import dataclasses

import torch

from specfleet.engine.fusion import FusedTreeBuilder
from specfleet.engine.llama import KvLimits, LlamaRunner, causal_bias, common_prefix
from specfleet.engine.proposers import Draft
from specfleet.engine.sampling import SamplingParams, draft_probs
from specfleet.engine.tree import TokenTree
from specfleet_kernels.reference import position_keyed_sample


class DrafterModel:
    """One drafter model over a slot KV cache; remembers, per request, which tokens its cache holds."""

    def __init__(self, name: str, model, slots: int, limits: KvLimits | None = None):
        self.name = name
        self.runner = LlamaRunner(model, slots=slots, limits=limits)
        if self.runner.slots < slots:  # a drafter holds every live request of its engine or service
            raise ValueError(f"drafter {name}: a KV cache of {self.runner.slots} slots fits the budget but {slots} "
                             "are needed; raise --kv-cache-memory or lower --max-model-len")
        self.free = list(range(slots - 1, -1, -1))
        self.slot: dict[str, int] = {}
        self.cached: dict[str, list[int]] = {}  # rid -> tokens whose KV is in its slot (columns 0..len-1)

    def release(self, rid: str) -> None:
        if rid in self.slot:
            self.free.append(self.slot.pop(rid))
            del self.cached[rid]

    def _slot_for(self, rid: str) -> int:
        if rid not in self.slot:
            if not self.free:
                raise RuntimeError(f"drafter {self.name}: all {self.runner.slots} slots are busy")
            self.slot[rid] = self.free.pop()
            self.cached[rid] = []
        return self.slot[rid]

    def begin(self, batch: list[Draft]) -> torch.Tensor:
        """Brings each request's cache up to its context (reusing the longest cached prefix) and returns the
        logits after the context: [B, V]."""
        slots, starts, feeds = [], [], []
        for d in batch:
            slots.append(self._slot_for(d.rid))
            common = common_prefix(self.cached[d.rid], d.context[:-1])  # feed >= 1 token to get logits
            starts.append(common)
            feeds.append(d.context[common:])
            self.cached[d.rid] = list(d.context)
        lengths = [len(f) for f in feeds]
        t = max(lengths)
        tokens = torch.tensor([f + [0] * (t - len(f)) for f in feeds])  # [B, T]
        cols = torch.tensor(starts)[:, None] + torch.arange(t)[None]  # [B, T]
        bias = causal_bias(starts, lengths, int(cols.max()) + 1)
        last = torch.tensor(lengths)[:, None] - 1  # [B, 1]
        return self.runner.forward(tokens, cols, cols, bias, logits_at=last, slots=torch.tensor(slots))[:, 0]

    def advance(self, rids: list[str], tokens: list[int]) -> torch.Tensor:
        """Feeds one token per request; returns the logits after it: [B, V]."""
        slots = torch.tensor([self.slot[r] for r in rids])
        cols = torch.tensor([len(self.cached[r]) for r in rids])[:, None]  # [B, 1]
        for r, tok in zip(rids, tokens, strict=True):
            self.cached[r].append(tok)
        bias = causal_bias(cols[:, 0].tolist(), [1] * len(rids), int(cols.max()) + 1)
        return self.runner.forward(torch.tensor(tokens)[:, None], cols, cols, bias, slots=slots)[:, 0]


def candidates(logits: torch.Tensor, drafts: list[Draft], level: int) -> tuple[list[int], list[float]]:
    """One drafter's proposal at draft `level` for each row: logits [B, V] -> (tokens, confidences).

    A greedy row proposes its argmax with its softmax probability. A sampled row draws from the drafter's own
    distribution q, warped like the request's (temperature, top-k, top-p: `draft_probs`), with the request's
    noise at this output position (`position_keyed_sample`), and reports q(token): the draft then agrees with the
    target's own sample far more often than an argmax draft does, and the output is unchanged (acceptance compares
    tokens)."""
    values, indices = torch.softmax(logits, dim=-1).max(dim=-1)  # [B], [B]
    tokens, confidences = indices.tolist(), values.tolist()
    by_params: dict[SamplingParams, list[int]] = {}
    for j, d in enumerate(drafts):
        if d.sampled:
            by_params.setdefault(d.params, []).append(j)
    for params, rows in by_params.items():
        q = draft_probs(logits[rows], params)  # [n, V]
        drawn = position_keyed_sample(q, [drafts[j].seed for j in rows], [drafts[j].position + level for j in rows])
        chosen = q.gather(-1, drawn[:, None])[:, 0]  # [n]
        for j, token, confidence in zip(rows, drawn.tolist(), chosen.tolist(), strict=True):
            tokens[j], confidences[j] = token, confidence
    return tokens, confidences


class ModelProposer:
    """Drafts with one model (a chain) or fuses several (a tree): per level every drafter proposes a token given the
    fused prefix (its most likely one, or for a sampled request one drawn with the request's noise: `candidates`);
    the most confident wins and is fed back; losers become branches."""

    def __init__(self, drafters: list[DrafterModel], max_branches_per_level: int = 2):
        if not drafters:
            raise ValueError("ModelProposer needs at least one drafter")
        self.drafters = {d.name: d for d in drafters}
        self.name = "model" if len(drafters) == 1 else "fused"
        self.max_branches_per_level = max_branches_per_level

    def start(self, rid: str, prompt: list[int]) -> None:
        pass

    def step_seconds(self, batch: int) -> float:
        """Profiled seconds of one drafting step of one drafter over `batch` requests (before any request)."""
        return max(d.runner.time_forward(batch, 1) for d in self.drafters.values())

    def stop(self, rid: str, output: list[int]) -> None:
        for d in self.drafters.values():
            d.release(rid)

    @torch.no_grad()
    def propose(self, batch: list[Draft]) -> list[TokenTree]:
        trees = [TokenTree.empty()] * len(batch)
        live = [i for i, d in enumerate(batch) if d.k > 0]
        if not live:
            return trees
        # Requests that share a drafter set draft together; usually that is the whole batch.
        groups: dict[tuple[str, ...], list[int]] = {}
        for i in live:
            names = tuple(n for n in (batch[i].drafters or self.drafters) if n in self.drafters) or tuple(self.drafters)
            groups.setdefault(names, []).append(i)
        for names, idx in groups.items():
            for i, tree in zip(idx, self._draft([batch[i] for i in idx], [self.drafters[n] for n in names]),
                               strict=True):
                trees[i] = tree
        return trees

    def _draft(self, batch: list[Draft], drafters: list[DrafterModel]) -> list[TokenTree]:
        builders = [FusedTreeBuilder(max_branches_per_level=self.max_branches_per_level) for _ in batch]
        logits = [d.begin(batch) for d in drafters]  # per drafter [B, V]
        rows = list(range(len(batch)))
        for level in range(max(d.k for d in batch)):
            # candidates per row: each drafter's token and its probability
            tops = [candidates(lg, [batch[row] for row in rows], level) for lg in logits]  # per drafter
            winners = []
            for j, row in enumerate(rows):
                cands = [(tokens[j], confidences[j]) for tokens, confidences in tops]
                winners.append(builders[row].add_level(cands))
            rows_next = [(j, row) for j, row in enumerate(rows) if level + 1 < batch[row].k]
            if not rows_next:
                break
            rows = [row for _, row in rows_next]
            rids = [batch[row].rid for row in rows]
            feed = [winners[j] for j, _ in rows_next]
            logits = [d.advance(rids, feed) for d in drafters]
        names = [d.name for d in drafters]
        trees = []
        for builder in builders:
            tree = builder.build()
            origins = tuple(tuple(names[i] for i in src) for src in builder.sources)
            trees.append(dataclasses.replace(tree, origins=origins))
        return trees
