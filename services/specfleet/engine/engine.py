"""The single-process speculative decoding engine: continuous batching of requests, drafting through any
proposer, tree verification of the whole batch in one target forward, lossless acceptance (greedy or sampled),
KV compaction, and per-request speculation control. Its output equals the target's own decoding."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from specfleet.engine.control import LeafPricer, Plan
from specfleet.engine.llama import KvLimits
from specfleet.engine.proposers import Draft, Proposer
from specfleet.engine.sampling import SamplingParams, make_generator
from specfleet.engine.suffix import SuffixProposer
from specfleet.engine.tree import TokenTree
from specfleet.engine.verify import TargetVerifier, VerifyItem, cut_at_finish

LOOKUP = SuffixProposer.name  # the lookup proposer's name in a tree's origins


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
    tokens: list[int]  # prompt + committed output
    generator: torch.Generator | None
    seed: int | None = None  # sampled requests: keys each output position's noise (position_gumbels)
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

    def decide(self, requests: list[str], max_k: dict[str, int] | None = None, kinds=None,
               lengths=None) -> dict[str, Plan]:
        return {rid: Plan(min(self.k, (max_k or {}).get(rid, self.k))) for rid in requests}

    def observe(self, *args, **kwargs) -> None:
        pass

    def forget(self, rid: str) -> None:
        pass


class SpecEngine:
    def __init__(self, target, proposer: Proposer, *, max_batch: int = 8, k: int = 4, policy=None,
                 eos_token_id: int | None = None, limits: KvLimits | None = None):
        # a draft head reads the target's features of every request (`use_proposer` switches it on)
        self.target = TargetVerifier(target, slots=max_batch, limits=limits,
                                     features=bool(getattr(proposer, "needs_features", False)))
        self.runner = self.target.runner
        self.proposer = proposer
        self.max_batch = self.runner.slots  # what the KV budget holds (at most max_batch)
        self.policy = policy or FixedK(k)
        self.eos_token_id = target.config.eos_token_id if eos_token_id is None else eos_token_id
        self.max_positions = self.target.max_positions
        self.timings = {"draft_s": 0.0, "verify_s": 0.0, "prefill_s": 0.0}
        # the suffix tree's lookups beside the models, per request kind: drafted while their nodes earn their
        # verification (`LeafPricer`); with no cost model (`FixedK`), for greedy rows and a lone request
        self.lookups = LeafPricer()
        self._price_leaves()

    # ------------------------------------------------------------------ public

    def use_proposer(self, proposer: Proposer) -> None:
        """Drafts with `proposer` from now on (before any request is live)."""
        if len(self.target):
            raise RuntimeError("the proposer changes only while no request is live")
        self.proposer = proposer
        self.target.keep_features = bool(getattr(proposer, "needs_features", False))
        self._price_leaves()

    def _price_leaves(self) -> None:
        """Prices optional nodes -- the suffix tree's lookups here, the leaves beside the draft head's chain in a
        proposer that shapes its trees (`price_with`) -- at the speculation controller's costs: the batch's expected
        tokens per second, a verified node's seconds and a drafted row's."""
        cost = getattr(self.policy, "cost", None)
        if cost is None:
            return

        def pricing():
            rate = self.policy.current_rate() if hasattr(self.policy, "current_rate") else 0.0
            return None if rate <= 0 else (rate, cost.verify_seconds_per_token(), cost.draft_step.slope)

        self.lookups.pricing = pricing
        if hasattr(self.proposer, "price_with"):
            self.proposer.price_with(pricing)

    def calibrate(self) -> None:
        """Profiles a target forward (batch 1: 1 and 16 tokens; a batched engine: 1 and 3 tokens in each of its
        rows) and a drafter step (batch 1 and max) on this machine and gives them to the speculation controller as
        priors, so its first decisions are already informed."""
        cost = getattr(self.policy, "cost", None)
        if cost is None:
            return
        # at the batch this engine runs (a token's marginal cost at batch 16 is not batch 1's: with the packed CPU
        # matmul a lone request's first few tree tokens are nearly free, while 16 rows pay attention per token)
        rows = self.max_batch
        if rows == 1:
            one, many, extra = self.runner.time_forward(1, 1), self.runner.time_forward(1, 16), 15
        else:
            one, many, extra = self.runner.time_forward(rows, 1), self.runner.time_forward(rows, 3), 2 * rows
        slope = max((many - one) / extra, 1e-6)
        verify = (max(one - slope * rows, 1e-5), slope)
        step = getattr(self.proposer, "step_seconds", None)
        if step is None:  # model-free proposers: drafting is a lookup
            draft = (5e-5, 1e-5)
        else:
            # step(): a level of every drafter. Drafters in one forward cost one step whatever a request uses;
            # drafters in separate forwards cost each theirs (the model's step is then one drafter's average).
            cost.parallel_drafters = bool(getattr(self.proposer, "drafts_in_one_forward", False))
            per = cost.drafter_factor(len(getattr(self.proposer, "drafters", ())) or 1)
            level = step(1)  # one draft level of every drafter for one request
            small, big = level / per, step(self.max_batch) / per
            per_request = max((big - small) / max(self.max_batch - 1, 1), 0.0)
            draft = (max(small - per_request, 1e-5), per_request)
            # a catch-up token (a prefill of what a request's drafters missed) in every drafter: far cheaper than a
            # draft level's row where the forward is bound by reading the weights (a GPU), about as dear on a CPU
            cost.catch_up_token = max((step(1, 33) - level) / 32, 0.0)
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
                live.append(self._admit(queue.popleft()))
            self.step(live, on_tokens)
            for lv in [lv for lv in live if lv.finish_reason]:
                res = self._retire(live, lv)
                results[res.rid] = res
                if on_done:
                    on_done(res)
        return [results[rid] for rid in order]

    # ------------------------------------------------------------------ internals

    def _admit(self, req: Request) -> _Live:
        t0 = time.perf_counter()
        self.target.sync(req.rid, req.prompt_ids)  # KV for all but the last prompt token, fed with the first tree
        self.proposer.start(req.rid, list(req.prompt_ids))
        self.timings["prefill_s"] += time.perf_counter() - t0
        gen = None if req.params.greedy else make_generator(req.params.seed)
        seed = None if gen is None else gen.initial_seed() if req.params.seed is None else req.params.seed
        return _Live(req=req, tokens=list(req.prompt_ids), generator=gen, seed=seed)

    def _retire(self, live: list[_Live], lv: _Live) -> Result:
        self.proposer.stop(lv.req.rid, list(lv.output))
        self.policy.forget(lv.req.rid)
        self.target.release(lv.req.rid)
        live.remove(lv)
        stats = dict(lv.stats)
        stats["accepted_per_round"] = stats["accepted_tokens"] / max(1, stats["rounds"])
        return Result(lv.req.rid, lv.output, lv.finish_reason, stats)

    def step(self, live: list[_Live], on_tokens=None) -> None:
        """One round for every live request: plan, draft, verify all trees in one forward, accept, commit."""
        lookup_k = getattr(self.policy, "k_max", getattr(self.policy, "k", 0)) \
            if getattr(self.proposer, "has_lookups", False) else 0
        # lengths: the drafters hold a cache per request, so drafting after rounds off costs a catch-up (priced);
        # lookups: a round that looks up is a speculative round to the controller's clock check, which may make it
        # plain, lookups included (`forced_plain`)
        extra = {"lookups": True} if lookup_k and hasattr(self.policy, "observe_round") else {}
        plans = self.policy.decide([lv.req.rid for lv in live], max_k={lv.req.rid: lv.remaining - 1 for lv in live},
                                   kinds={lv.req.rid: lv.req.params.kind for lv in live},
                                   lengths={lv.req.rid: len(lv.tokens) for lv in live}, **extra)
        if getattr(self.policy, "forced_plain", False):
            lookup_k = 0
        features = self.target.features_of if self.target.keep_features else None
        # a free lookup beside the models (the fused suffix tree) drafts the most levels allowed, whatever the plan,
        # for the kinds of request whose lookup nodes earn their verification: a greedy request's accept often, a
        # sampled one's rarely (bench/engine.json: 0.2 accepted per round), which paid alone on a CPU whose verify
        # forward costs about the same for 1 and 16 tokens (batch 1 sampled 0.90x -> 1.09x) but not in a batch,
        # where every node is a token of a forward that plain decoding does not pay (batch 4 / 16 / 32: 0.92x /
        # 0.83x / 0.70x against 0.94x / 0.87x / 0.94x without). Unpriced: greedy rows and a lone request look up
        prices = self.lookups.prices() if lookup_k else None
        if prices is not None:
            kinds = [lv.req.params.kind for lv in live]
            looks = {kind: self.lookups.pays(kind, LOOKUP, prices) for kind in set(kinds)}
            for kind in [kind for kind, on in looks.items() if on]:
                self.lookups.paid(kind)
            # a kind whose lookups do not pay is re-tried by one of its requests at a time (in turn), never by the
            # whole batch at once: at batch 16 that round would verify up to 16 x 16 lookup nodes
            explorer = {kind: [i for i, k in enumerate(kinds) if k == kind] for kind, on in looks.items()
                        if not on and self.lookups.exploring(kind)}
            chosen = {rows[self.lookups.explorations[kind] % len(rows)] for kind, rows in explorer.items()}
        else:
            looks, chosen = {"greedy": True, "sampled": len(live) == 1}, set()

        def lookup(i: int, lv: _Live) -> int:
            k = lookup_k if looks[lv.req.params.kind] or i in chosen else 0
            return max(0, min(k, lv.remaining - 1))

        drafts = [Draft(lv.req.rid, lv.tokens, plans[lv.req.rid].k, tuple(plans[lv.req.rid].drafters) or None,
                        lv.req.params, lv.seed, len(lv.output),
                        features(lv.req.rid) if features and lv.req.rid in self.target else None,
                        lookup(i, lv)) for i, lv in enumerate(live)]
        drafting = [d for d in drafts if d.k > 0 or d.lookup_k > 0]
        t0 = time.perf_counter()
        # a round where nobody drafts (speculation off at a large batch) never reaches the proposer: plain decoding
        trees = self.proposer.propose(drafts) if drafting else [TokenTree.empty()] * len(drafts)
        t1 = time.perf_counter()
        verdicts = self.target.verify([VerifyItem(lv.req.rid, lv.tokens, tree, lv.req.params, len(lv.output),
                                                  lv.seed, lv.generator) for lv, tree in zip(live, trees, strict=True)])
        t2 = time.perf_counter()
        # drafters catching up on a prompt or on tokens they missed: prefill, not the price of a draft level
        prefill = getattr(self.proposer, "last_prefill_seconds", 0.0) if drafting else 0.0
        self.timings["draft_s"] += t1 - t0 - prefill
        self.timings["prefill_s"] += prefill
        self.timings["verify_s"] += t2 - t1
        if self.policy.cost is not None:
            # the models' draft levels only (a lookup-only round, or rows whose lookup tree sufficed, ran none)
            model_steps = getattr(self.proposer, "last_model_steps", max((d.k for d in drafting), default=0))
            if drafting and model_steps:
                priced = [d for d in drafting if d.k > 0]
                used = {n for d in priced for n in (d.drafters or ())} or {self.proposer.name}
                self.policy.cost.observe_draft(len(priced), len(used), model_steps, t1 - t0 - prefill)
            self.policy.cost.observe_verify(sum(len(t) + 1 for t in trees), t2 - t1)
        if hasattr(self.policy, "observe_round"):  # the clock's check: does speculating pay here, in fact?
            self.policy.observe_round(len(live), plans, t2 - t0, sum(len(v.tokens) for v in verdicts),
                                      drafted=bool(drafting))
        probes = sum(1 for d in drafting if plans[d.rid].probe)
        if probes and hasattr(self.policy, "charge_probes"):
            # the probes' share of the drafters' catch-up (tokens missed while off), settled against the price the
            # plan put on it (none measured as prefill: a short catch-up, inside the draft time)
            self.policy.charge_probes(prefill * probes / len(drafting))
        learn = getattr(self.proposer, "observe_accepted", None) if drafting else None
        for lv, draft, tree, verdict in zip(live, drafts, trees, verdicts, strict=True):
            if learn is not None and len(tree):
                learn(lv.req.rid, verdict.tokens[:len(verdict.path)])
            if draft.lookup_k and tree.origins is not None:  # what the lookup's own nodes (no model's) earned
                alone = [i for i, o in enumerate(tree.origins) if o == (LOOKUP,)]
                self.lookups.observe(lv.req.params.kind, LOOKUP, len(set(alone) & set(verdict.path)), len(alone))
            lv.stats["rounds"] += 1
            lv.stats["draft_tokens"] += len(tree)
            lv.stats["accepted_tokens"] += len(verdict.path)
            credited = [tree.origins[i] for i in verdict.path] if tree.origins is not None else None
            self.policy.observe(lv.req.rid, plans[lv.req.rid], tree.max_depth, len(verdict.path), credited, len(tree))
            self._commit(lv, verdict.tokens, on_tokens)

    def _commit(self, lv: _Live, new: list[int], on_tokens) -> None:
        new, reason = cut_at_finish(new, lv.remaining, self.eos_token_id, lv.req.ignore_eos)
        lv.finish_reason = reason or None
        lv.output += new
        lv.tokens += new
        if on_tokens and new:
            on_tokens(lv.req.rid, new)
