"""Model drafters: one or several small Llama models drafting a batch of requests position by position. With
several drafters, CoSine's confidence fusion picks each position's token, feeds it back to every drafter and keeps
the losers as branches (`fusion.FusedTreeBuilder`). Drafters of one shape run as one group (`stack_drafters`): one
batched forward per draft level for all of them, with one slot map, since every member is fed the same tokens."""

from __future__ import annotations

import dataclasses
import time

import torch

from specfleet.engine.fusion import FusedTreeBuilder
from specfleet.engine.llama import KvLimits, LlamaRunner, causal_bias, common_prefix, same_shape
from specfleet.engine.proposers import Draft
from specfleet.engine.sampling import SamplingParams, SubVocab, argmax, keyed_draft_sample
from specfleet.engine.tree import TokenTree

PREFILL_FEED = 8  # a begin() feeding more tokens than this to some request counts as prefill


class DrafterModel:
    """A drafter model over a slot KV cache, or a group of drafters of one shape run as one (`names` and a list of
    models: one batched forward per call for all of them); remembers, per request, which tokens its cache holds.
    `begin` and `advance` return logits [members, B, V]."""

    def __init__(self, name: str | tuple[str, ...], model, slots: int, limits: KvLimits | None = None):
        self.names = (name,) if isinstance(name, str) else tuple(name)
        self.name = "+".join(self.names)
        self.runner = LlamaRunner(model, slots=slots, limits=limits)
        if self.runner.slots < slots:  # a drafter holds every live request of its engine or service
            raise ValueError(f"drafter {self.name}: a KV cache of {self.runner.slots} slots fits the budget but "
                             f"{slots} are needed; raise --kv-cache-memory or lower --max-model-len")
        self.last_prefill_seconds = 0.0
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
        logits after the context: [members, B, V]."""
        slots, starts, feeds = [], [], []
        for d in batch:
            slots.append(self._slot_for(d.rid))
            common = common_prefix(self.cached[d.rid], d.context[:-1])  # feed >= 1 token to get logits
            starts.append(common)
            feeds.append(d.context[common:])
            self.cached[d.rid] = list(d.context)
        lengths = [len(f) for f in feeds]
        t = max(lengths)
        started = time.perf_counter()
        dev = self.runner.device
        tokens = torch.tensor([f + [0] * (t - len(f)) for f in feeds], device=dev)  # [B, T]
        cols = torch.tensor(starts, device=dev)[:, None] + torch.arange(t, device=dev)[None]  # [B, T]
        bias = causal_bias(starts, lengths, max(starts) + t, dev)
        last = torch.tensor(lengths, device=dev)[:, None] - 1  # [B, 1]
        # lengths: a row catching up on many tokens beside rows fed one costs its own tokens, not t for every row
        logits = self.runner.forward(tokens, cols, cols, bias, logits_at=last, slots=torch.tensor(slots, device=dev),
                                     lengths=lengths)[:, 0]
        # A long feed is a prefill (a new request's prompt, or tokens missed while it did not draft), not the
        # per-level cost of drafting: reported apart so the cost model prices draft levels only.
        self.last_prefill_seconds = time.perf_counter() - started if t > PREFILL_FEED else 0.0
        return logits.view(len(self.names), len(batch), -1)

    def advance(self, rids: list[str], tokens: list[int]) -> torch.Tensor:
        """Feeds one token per request; returns the logits after it: [members, B, V]."""
        dev = self.runner.device
        slots = torch.tensor([self.slot[r] for r in rids], device=dev)
        at = [len(self.cached[r]) for r in rids]  # each row's column, on the host
        cols = torch.tensor(at, device=dev)[:, None]  # [B, 1]
        for r, tok in zip(rids, tokens, strict=True):
            self.cached[r].append(tok)
        bias = causal_bias(at, [1] * len(rids), max(at) + 1, dev)
        logits = self.runner.forward(torch.tensor(tokens, device=dev)[:, None], cols, cols, bias, slots=slots)[:, 0]
        return logits.view(len(self.names), len(rids), -1)


def stack_drafters(named_models: list[tuple[str, object]], slots: int, limits: KvLimits | None = None,
                   stack: bool = True) -> list[DrafterModel]:
    """DrafterModels for (name, model) pairs: those of one shape grouped into one (when `stack`), in first-seen
    order; a model whose shape no other shares stays alone."""
    groups: list[list[tuple[str, object]]] = []
    for name, model in named_models:
        home = next((g for g in groups if stack and same_shape(g[0][1].config, model.config)), None)
        if home is None:
            groups.append([(name, model)])
        else:
            home.append((name, model))
    return [DrafterModel(g[0][0], g[0][1], slots, limits) if len(g) == 1
            else DrafterModel(tuple(n for n, _ in g), [m for _, m in g], slots, limits) for g in groups]


def candidates(logits: torch.Tensor, drafts: list[Draft], level: int, siblings: dict[str, int] | None = None,
               sibling_rows: int | None = None, vocab: SubVocab | None = None
               ) -> tuple[list[int], list[float], list[list[tuple[int, float]]]]:
    """One drafter's proposal at draft `level` for each row: logits [B, V] -> (tokens, confidences, alternatives).

    A greedy row proposes its argmax with its softmax probability. A sampled row draws from the drafter's own
    distribution, warped like the request's, with the request's noise at this output position
    (`keyed_draft_sample`), and reports the token's probability: the draft then agrees with the target's own sample
    far more often than an argmax draft does, and the output is unchanged (acceptance compares tokens). Rows of
    the same temperature, top-k and top-p draw together.

    siblings: how many alternatives (token, confidence) to return per row by its kind ("greedy" / "sampled";
    none by default): a greedy row's next likeliest tokens, a sampled row's next best under the same noise; only
    for the first `sibling_rows` rows when given (rows after them: no alternatives). vocab: the logits' columns are
    these token ids (a draft head's reduced vocabulary); the tokens returned are ids either way."""
    tokens: list[int] = [0] * len(drafts)
    confidences: list[float] = [0.0] * len(drafts)
    alternatives: list[list[tuple[int, float]]] = [[] for _ in drafts]
    want = siblings or {}
    if not all(d.sampled for d in drafts):
        # the full-vocabulary softmax and max (~70 us on a real vocabulary) only where some row is greedy: a sampled
        # row's token and confidence come from keyed_draft_sample, which overwrites them below
        probs = torch.softmax(logits, dim=-1)
        indices = argmax(probs)  # [B] (torch's max over a dim costs ~10x numpy's argmax and a gather)
        values = probs.gather(-1, indices.to(probs.device)[:, None])[:, 0]  # [B]
        ids = None if vocab is None else vocab.id_list
        tokens, confidences = indices.tolist(), values.tolist()
        if ids is not None:
            tokens = [ids[c] for c in tokens]
        greedy_siblings = want.get("greedy", 0)
        upto = len(drafts) if sibling_rows is None else sibling_rows
        if greedy_siblings and upto > 0:
            top_values, top_indices = probs[:upto].topk(greedy_siblings + 1, dim=-1)
            for j, (row, row_values) in enumerate(zip(top_indices.tolist(), top_values.tolist(), strict=True)):
                if not drafts[j].sampled:
                    alternatives[j] = [(t if ids is None else ids[t], q) for t, q in zip(row, row_values, strict=True)
                                       if (t if ids is None else ids[t]) != tokens[j]][:greedy_siblings]
    by_params: dict[SamplingParams, list[int]] = {}
    for j, d in enumerate(drafts):
        if d.sampled:
            by_params.setdefault(dataclasses.replace(d.params, seed=None), []).append(j)
    for params, rows in by_params.items():
        # every row (the usual case: one request, or one kind): the logits themselves, no gathered copy
        picked = logits if len(rows) == len(drafts) else logits[rows]
        # rows ascend, so the group's rows before `sibling_rows` are its first ones
        firsts = None if sibling_rows is None else sum(1 for j in rows if j < sibling_rows)
        drawn, chosen, alts = keyed_draft_sample(picked, params, [drafts[j].seed for j in rows],
                                                 [drafts[j].position + level for j in rows], want.get("sampled", 0),
                                                 firsts, vocab)
        for j, token, confidence, alt in zip(rows, drawn, chosen, alts, strict=True):
            tokens[j], confidences[j], alternatives[j] = token, confidence, alt
    return tokens, confidences, alternatives


class ModelProposer:
    """Drafts with one model (a chain) or fuses several (a tree): per level every drafter proposes a token given the
    fused prefix (its most likely one, or for a sampled request one drawn with the request's noise: `candidates`);
    the most confident wins and is fed back; losers become branches. Drafters grouped in one DrafterModel draft
    each level in one forward; a request that asks for some of a group's members still feeds all of them (their
    caches stay in step) but only its members' candidates enter its tree."""

    def __init__(self, drafters: list[DrafterModel], max_branches_per_level: int = 2):
        if not drafters:
            raise ValueError("ModelProposer needs at least one drafter")
        self.units = list(drafters)
        self.drafters = {name: unit for unit in self.units for name in unit.names}  # name -> its DrafterModel
        self.name = "model" if len(self.drafters) == 1 else "fused"
        self.max_branches_per_level = max_branches_per_level
        self.last_prefill_seconds = 0.0  # of the last propose: drafters catching up (DrafterModel.begin)

    def start(self, rid: str, prompt: list[int]) -> None:
        pass

    @property
    def drafts_in_one_forward(self) -> bool:
        """Every drafter in one group: a draft level costs one forward however many drafters a request uses."""
        return len(self.units) == 1

    def step_seconds(self, batch: int, tokens: int = 1) -> float:
        """Profiled seconds of one drafting level of every drafter over `batch` requests (before any request); with
        `tokens`, of a forward of that many tokens in each (a catch-up's prefill)."""
        return sum(unit.runner.time_forward(batch, tokens) for unit in self.units)

    def stop(self, rid: str, output: list[int]) -> None:
        for unit in self.units:
            unit.release(rid)

    @torch.no_grad()
    def propose(self, batch: list[Draft]) -> list[TokenTree]:
        trees = [TokenTree.empty()] * len(batch)
        self.last_prefill_seconds = 0.0
        live = [i for i, d in enumerate(batch) if d.k > 0]
        if not live:
            return trees
        # Requests that share a drafter set draft together; usually that is the whole batch.
        groups: dict[tuple[str, ...], list[int]] = {}
        for i in live:
            # a plan naming none of these drafters (only the draft head, say) leaves the row to the others
            asked = batch[i].drafters
            names = tuple(n for n in asked if n in self.drafters) if asked else tuple(self.drafters)
            if names:
                groups.setdefault(names, []).append(i)
        for names, idx in groups.items():
            for i, tree in zip(idx, self._draft([batch[i] for i in idx], names), strict=True):
                trees[i] = tree
        return trees

    def _draft(self, batch: list[Draft], names: tuple[str, ...]) -> list[TokenTree]:
        units = list(dict.fromkeys(self.drafters[n] for n in names))  # each DrafterModel once, first-use order
        # where each drafter's logits are in the units' outputs stacked member-major: [sum of members, B, V]
        offsets, at = {}, 0
        for unit in units:
            offsets[unit] = at
            at += len(unit.names)
        pick = torch.tensor([offsets[self.drafters[n]] + self.drafters[n].names.index(n) for n in names],
                            device=units[0].runner.device)
        builders = [FusedTreeBuilder(max_branches_per_level=self.max_branches_per_level) for _ in batch]
        logits = torch.cat([unit.begin(batch) for unit in units])[pick]  # [drafters, B, V]
        self.last_prefill_seconds += sum(unit.last_prefill_seconds for unit in units)
        rows = list(range(len(batch)))
        for level in range(max(d.k for d in batch)):
            # candidates per row: each drafter's token and its probability, all drafters in one call
            tokens, confidences, _ = candidates(logits.flatten(0, 1), [batch[row] for row in rows] * len(names),
                                                level)
            width = len(rows)
            winners = []
            for j, row in enumerate(rows):
                cands = [(tokens[m * width + j], confidences[m * width + j]) for m in range(len(names))]
                winners.append(builders[row].add_level(cands))
            rows_next = [(j, row) for j, row in enumerate(rows) if level + 1 < batch[row].k]
            if not rows_next:
                break
            rows = [row for _, row in rows_next]
            rids = [batch[row].rid for row in rows]
            feed = [winners[j] for j, _ in rows_next]
            logits = torch.cat([unit.advance(rids, feed) for unit in units])[pick]
        trees = []
        for builder in builders:
            tree = builder.build()
            origins = tuple(tuple(names[i] for i in src) for src in builder.sources)
            trees.append(dataclasses.replace(tree, origins=origins))
        return trees
