"""The single-process speculative decoding engine: continuous batching of requests, drafting through any
proposer, tree verification of the whole batch in one target forward, lossless acceptance (greedy or sampled),
KV compaction, and per-request speculation control. Its output equals the target's own decoding."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from specfleet.engine.control import Plan
from specfleet.engine.llama import NEG, LlamaRunner, causal_bias
from specfleet.engine.proposers import Draft, Proposer
from specfleet.engine.sampling import SamplingParams, make_generator, warp_probs
from specfleet.engine.tree import TokenTree
from specfleet_kernels.reference import greedy_accept, sampled_tree_accept, tree_ancestor_mask, tree_depths


@dataclass
class Request:
    rid: str
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    ignore_eos: bool = False


@dataclass
class Result:
    rid: str
    token_ids: list[int]
    finish_reason: str  # "length" or "stop"
    stats: dict


@dataclass
class _Live:
    req: Request
    slot: int
    cached: int  # KV columns committed in the target's slot: every context token but the last (pending)
    tokens: list[int]  # prompt + committed output
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=lambda: {"rounds": 0, "draft_tokens": 0, "accepted_tokens": 0})
    finish_reason: str | None = None

    @property
    def remaining(self) -> int:
        return self.req.max_new_tokens - len(self.output)


class FixedK:
    """The simplest speculation policy: always draft k levels with every drafter (`--no-adaptive`)."""

    cost = None

    def __init__(self, k: int):
        self.k = k

    def decide(self, requests: list[str], max_k: dict[str, int] | None = None) -> dict[str, Plan]:
        return {rid: Plan(min(self.k, (max_k or {}).get(rid, self.k))) for rid in requests}

    def observe(self, *args, **kwargs) -> None:
        pass

    def forget(self, rid: str) -> None:
        pass


class SpecEngine:
    def __init__(self, target, proposer: Proposer, *, max_batch: int = 8, k: int = 4, policy=None,
                 eos_token_id: int | None = None):
        self.runner = LlamaRunner(target, slots=max_batch)
        self.proposer = proposer
        self.max_batch = max_batch
        self.policy = policy or FixedK(k)
        self.eos_token_id = target.config.eos_token_id if eos_token_id is None else eos_token_id
        self.max_positions = self.runner.max_positions
        self.timings = {"draft_s": 0.0, "verify_s": 0.0, "prefill_s": 0.0}

    # ------------------------------------------------------------------ public

    def calibrate(self) -> None:
        """Profiles a target forward (1 and 16 tokens) and a drafter step (batch 1 and max) on this machine and
        gives them to the speculation controller as priors, so its first decisions are already informed."""
        cost = getattr(self.policy, "cost", None)
        if cost is None:
            return
        one, many = self.runner.time_forward(1, 1), self.runner.time_forward(1, 16)
        slope = max((many - one) / 15, 1e-6)
        verify = (max(one - slope, 1e-5), slope)
        step = getattr(self.proposer, "step_seconds", None)
        if step is None:  # model-free proposers: drafting is a lookup
            draft = (5e-5, 1e-5)
        else:
            small, big = step(1), step(self.max_batch)
            per_request = max((big - small) / max(self.max_batch - 1, 1), 0.0)
            draft = (max(small - per_request, 1e-5), per_request)
        cost.set_priors(draft, verify)

    def check(self, req: Request) -> None:
        """Raises ValueError with what to fix when a request cannot be served."""
        if not req.prompt_ids:
            raise ValueError(f"request {req.rid!r}: the prompt is empty; give at least one token")
        if req.max_new_tokens <= 0:
            raise ValueError(f"request {req.rid!r}: max_new_tokens must be positive, got {req.max_new_tokens}")
        if len(req.prompt_ids) + req.max_new_tokens > self.max_positions:
            raise ValueError(f"request {req.rid!r}: prompt ({len(req.prompt_ids)} tokens) + max_new_tokens "
                             f"({req.max_new_tokens}) exceeds the model's context of {self.max_positions}; "
                             "shorten the prompt or ask for fewer tokens")
        vocab = self.runner.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_ids):
            raise ValueError(f"request {req.rid!r}: prompt token ids must be in [0, {vocab})")
        req.params.validate()

    def generate(self, requests: Iterable[Request],
                 on_tokens: Callable[[str, list[int]], None] | None = None,
                 on_done: Callable[[Result], None] | None = None) -> list[Result]:
        """Runs every request to completion, at most max_batch at a time; results in input order."""
        queue = deque(requests)
        for req in queue:
            self.check(req)
        order = [r.rid for r in queue]
        if len(set(order)) != len(order):
            raise ValueError("request ids must be unique within one generate call")
        live: list[_Live] = []
        results: dict[str, Result] = {}
        while queue or live:
            while queue and len(live) < self.max_batch:
                live.append(self._admit(queue.popleft(), slot=len(live)))
            self.step(live, on_tokens)
            for lv in [lv for lv in live if lv.finish_reason]:
                res = self._retire(live, lv)
                results[res.rid] = res
                if on_done:
                    on_done(res)
        return [results[rid] for rid in order]

    # ------------------------------------------------------------------ internals

    def _admit(self, req: Request, slot: int) -> _Live:
        t0 = time.perf_counter()
        prompt = req.prompt_ids
        if len(prompt) > 1:  # KV for all but the last prompt token, which is fed with the first tree
            n = len(prompt) - 1
            cols = torch.arange(n)[None]
            self.runner.forward(torch.tensor([prompt[:-1]]), cols, cols, causal_bias([0], [n], n),
                                logits_at=torch.tensor([[n - 1]]), slots=torch.tensor([slot]))
        self.proposer.start(req.rid, list(prompt))
        self.timings["prefill_s"] += time.perf_counter() - t0
        gen = None if req.params.greedy else make_generator(req.params.seed)
        return _Live(req=req, slot=slot, cached=len(prompt) - 1, tokens=list(prompt), generator=gen)

    def _retire(self, live: list[_Live], lv: _Live) -> Result:
        self.proposer.stop(lv.req.rid, list(lv.output))
        self.policy.forget(lv.req.rid)
        last = live[-1]
        if last is not lv:  # keep live slots packed at 0..B-1: the last one moves into the hole
            self.runner.move_slot(last.slot, lv.slot, last.cached)
            last.slot = lv.slot
            live[live.index(lv)] = last
        live.pop()
        stats = dict(lv.stats)
        stats["accepted_per_round"] = stats["accepted_tokens"] / max(1, stats["rounds"])
        return Result(lv.req.rid, lv.output, lv.finish_reason, stats)

    def step(self, live: list[_Live], on_tokens=None) -> None:
        """One round for every live request: plan, draft, verify all trees in one forward, accept, commit."""
        plans = self.policy.decide([lv.req.rid for lv in live], max_k={lv.req.rid: lv.remaining - 1 for lv in live})
        drafts = [Draft(lv.req.rid, lv.tokens, plans[lv.req.rid].k, tuple(plans[lv.req.rid].drafters) or None)
                  for lv in live]
        t0 = time.perf_counter()
        trees = self.proposer.propose(drafts)
        t1 = time.perf_counter()
        logits = self._verify(live, trees)  # [B, T, V]
        t2 = time.perf_counter()
        self.timings["draft_s"] += t1 - t0
        self.timings["verify_s"] += t2 - t1
        if self.policy.cost is not None:
            drafting = [d for d in drafts if d.k > 0]
            if drafting:
                used = {n for d in drafting for n in (d.drafters or ())} or {self.proposer.name}
                self.policy.cost.observe_draft(len(drafting), len(used), max(d.k for d in drafting), t1 - t0)
            self.policy.cost.observe_verify(sum(len(t) + 1 for t in trees), t2 - t1)
        for b, (lv, tree) in enumerate(zip(live, trees, strict=True)):
            n = len(tree)
            if lv.req.params.greedy:
                path, nxt = greedy_accept(tree.tokens, tree.parents, logits[b, :n + 1].argmax(-1))
            else:
                probs = warp_probs(logits[b, :n + 1], lv.req.params)  # [n + 1, V]
                path, nxt = sampled_tree_accept(tree.tokens, tree.parents, probs, tree.draft_probs, lv.generator)
            # KV of the pending token stays at column `cached`; the accepted nodes' KV moves right after it
            self.runner.keep(lv.slot, lv.cached + 1, lv.cached + 1 + torch.tensor(path, dtype=torch.long))
            new = tree.tokens[path].tolist() + [nxt]
            lv.cached += 1 + len(path)
            lv.stats["rounds"] += 1
            lv.stats["draft_tokens"] += n
            lv.stats["accepted_tokens"] += len(path)
            credited = [tree.origins[i] for i in path] if tree.origins is not None else None
            self.policy.observe(lv.req.rid, plans[lv.req.rid], tree.max_depth, len(path), credited, n)
            self._commit(lv, new, on_tokens)

    def _commit(self, lv: _Live, new: list[int], on_tokens) -> None:
        new = new[:lv.remaining]
        if not lv.req.ignore_eos and self.eos_token_id in new:
            new = new[:new.index(self.eos_token_id) + 1]
            lv.finish_reason = "stop"
        lv.output += new
        lv.tokens += new
        if lv.remaining <= 0 and not lv.finish_reason:
            lv.finish_reason = "length"
        if on_tokens and new:
            on_tokens(lv.req.rid, new)

    def _verify(self, live: list[_Live], trees: list[TokenTree]) -> torch.Tensor:
        """One target forward over every request's pending token + tree; returns logits [B, T, V]."""
        b = len(live)
        t = 1 + max(len(tr) for tr in trees)
        width = max(lv.cached for lv in live) + t
        tokens = torch.zeros(b, t, dtype=torch.long)
        positions = torch.zeros(b, t, dtype=torch.long)
        bias = torch.full((b, 1, t, width), NEG)
        cols = torch.tensor([lv.cached for lv in live])[:, None] + torch.arange(t)[None]  # [B, T]
        for r, (lv, tree) in enumerate(zip(live, trees, strict=True)):
            n = len(tree) + 1
            # node 0 is the pending token; draft roots hang off it
            parents = torch.cat([torch.tensor([-1]), torch.where(tree.parents < 0, 0, tree.parents + 1)])
            tokens[r, 0] = lv.tokens[-1]
            tokens[r, 1:n] = tree.tokens
            positions[r, :n] = lv.cached + tree_depths(parents)
            positions[r, n:] = lv.cached
            bias[r, 0, :n, :lv.cached] = 0.0
            bias[r, 0, :n, lv.cached:lv.cached + n] = torch.where(tree_ancestor_mask(parents), 0.0, NEG)
            bias[r, 0, n:, 0] = 0.0  # padding rows see one column (never an all-hidden row)
        return self.runner.forward(tokens, positions, cols, bias)
