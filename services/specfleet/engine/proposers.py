"""Proposers: each drafts a token tree continuing a request's tokens. One protocol, small classes.

Every proposer follows `Proposer`: `start`, batched `propose` (each `Draft` carries the request's tokens so far and
a level budget k) and `stop`. A proposer never changes the output, only how fast it is produced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

from specfleet.engine.sampling import SamplingParams
from specfleet.engine.tree import TokenTree


class Proposer(Protocol):
    """Drafts token trees for many requests at once. Lifecycle after ArcticInference's suffix decoding:
    `start` when a request arrives, `propose` once per round, `stop` when it finishes (with its output, so
    proposers that learn from earlier outputs can)."""

    name: str

    def start(self, rid: str, prompt: list[int]) -> None: ...

    def propose(self, batch: list[Draft]) -> list[TokenTree]: ...

    def stop(self, rid: str, output: list[int]) -> None: ...


@dataclass(frozen=True)
class Draft:
    """One request's ask for a draft: every token known so far (prompt + committed output) and the most
    levels the tree may have (k). A proposer may return a smaller tree, or an empty one."""

    rid: str
    context: list[int]
    k: int
    drafters: tuple[str, ...] | None = None  # which drafter models to use (None: all the proposer has)
    # A sampled request's parameters, seed and output position (index of the next output token): model drafters then
    # draw each level with the request's noise at that position (`position_keyed_sample`); None drafts argmax.
    params: SamplingParams | None = None
    seed: int | None = None
    position: int = 0
    # A draft head's input (proposers with needs_features): the target's features of context[:-1], [len - 1, H].
    features: object | None = None
    # Levels a free lookup (the suffix tree, in a `MergedProposer`) may draft whatever k the plan gives the models:
    # a lookup costs microseconds, so it drafts even in rounds where the plan switches the model drafters off.
    lookup_k: int = 0

    @property
    def sampled(self) -> bool:
        return self.params is not None and not self.params.greedy and self.seed is not None


class StatelessProposer:
    """Base for proposers that keep nothing per request."""

    name = "stateless"

    def start(self, rid: str, prompt: list[int]) -> None:
        pass

    def stop(self, rid: str, output: list[int]) -> None:
        pass

    def propose(self, batch: list[Draft]) -> list[TokenTree]:
        return [self.propose_one(d.context, d.k) if d.k > 0 else TokenTree.empty() for d in batch]

    def propose_one(self, context: list[int], k: int) -> TokenTree:
        raise NotImplementedError


class NoProposer(StatelessProposer):
    """Plain decoding through the same verification path: an empty tree every round."""

    name = "none"

    def propose_one(self, context: list[int], k: int) -> TokenTree:
        return TokenTree.empty()


class NgramProposer(StatelessProposer):
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (longest n first) and
    propose the k tokens that followed it."""

    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def propose_one(self, context: list[int], k: int) -> TokenTree:
        for n in range(min(self.max_n, len(context) - 1), self.min_n - 1, -1):
            suffix = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):  # latest match first, never the suffix itself
                if context[start:start + n] == suffix:
                    follow = context[start + n:start + n + k]
                    return TokenTree.chain(follow)
        return TokenTree.empty()


class MergedProposer:
    """Several proposers drafting the same requests, their trees merged into one per request (prefix-deduplicated,
    siblings by confidence; `fusion.merge_trees`). Each node is credited to the proposers behind it. Used to add
    the nearly free suffix-tree drafts to the model drafters' fused tree."""

    def __init__(self, proposers: list, name: str):
        self.proposers, self.name = proposers, name
        self.last_model_steps = 0  # of the last propose: the most levels a member with a model drafted
        self.last_prefill_seconds = 0.0  # of the last propose: its members catching up (only those that ran)

    def __getattr__(self, attr):  # step_seconds, drafters, ...: the first proposer's (the model drafters)
        return getattr(self.proposers[0], attr)

    @property
    def drafters(self) -> dict:
        """Every member's drafters by name (the specialists and the draft head are routed and credited alike)."""
        return {name: d for p in self.proposers for name, d in getattr(p, "drafters", {}).items()}

    @property
    def drafts_in_one_forward(self) -> bool:
        """One member with models drafting in one forward; a draft head beside the drafters is a second forward."""
        models = [p for p in self.proposers if hasattr(p, "step_seconds")]
        return len(models) == 1 and bool(getattr(models[0], "drafts_in_one_forward", False))

    def step_seconds(self, batch: int, tokens: int = 1) -> float:
        """A draft level of every member with a model (drafters, a draft head); lookups cost nothing here."""
        return sum(p.step_seconds(batch, tokens) for p in self.proposers if hasattr(p, "step_seconds"))

    @property
    def needs_features(self) -> bool:
        return any(getattr(p, "needs_features", False) for p in self.proposers)

    def start(self, rid: str, prompt: list[int]) -> None:
        for p in self.proposers:
            p.start(rid, prompt)

    def stop(self, rid: str, output: list[int]) -> None:
        for p in self.proposers:
            p.stop(rid, output)

    def observe_accepted(self, rid: str, accepted: list[int]) -> None:
        """The round's accepted draft tokens, to every member that learns from them (the draft head's tree shape)."""
        for p in self.proposers:
            if hasattr(p, "observe_accepted"):
                p.observe_accepted(rid, accepted)

    def price_with(self, pricing) -> None:
        for p in self.proposers:
            if hasattr(p, "price_with"):
                p.price_with(pricing)

    @property
    def has_lookups(self) -> bool:
        """Whether a member drafts by lookup (no model step): it then drafts `Draft.lookup_k` levels every round."""
        return any(not hasattr(p, "step_seconds") for p in self.proposers)

    @staticmethod
    def _lookup_suffices(tree: TokenTree, k: int) -> bool:
        """Whether a lookup's tree makes the models' k levels not worth drafting this round."""
        return len(tree) > 0 and tree.max_depth >= k

    def propose(self, batch: list[Draft]) -> list[TokenTree]:
        from specfleet.engine.fusion import merge_trees_with_origins

        # Lookups first, at max(k, lookup_k) levels: they cost microseconds. A greedy row whose lookup tree already
        # reaches the models' planned depth skips the models this round (a draft level of theirs costs a fraction of a
        # target step and would only add branches beside a repeat the text already predicts).
        lookups = [p for p in self.proposers if not hasattr(p, "step_seconds")]
        deep = [dataclasses.replace(d, k=max(d.k, d.lookup_k)) if d.lookup_k > d.k else d for d in batch]
        looked = {id(p): p.propose(deep) for p in lookups}
        # Greedy rows only: a sampled row's lookup nodes are fixed tokens the target's sample matches with probability
        # p(token) (0.2 accepted per round on varied text), where the models' drafts drawn with the request's noise
        # match it far more often (the head: 0.8), so they draft whatever the lookup found.
        model_batch = [dataclasses.replace(d, k=0) if d.k > 0 and not d.sampled and any(
            self._lookup_suffices(trees[i], d.k) for trees in looked.values()) else d for i, d in enumerate(batch)]
        self.last_model_steps = max((d.k for d in model_batch), default=0)
        per_proposer = [looked[id(p)] if id(p) in looked else
                        p.propose(model_batch) if self.last_model_steps else [TokenTree.empty()] * len(batch)
                        for p in self.proposers]
        ran = lookups + ([p for p in self.proposers if p not in lookups] if self.last_model_steps else [])
        self.last_prefill_seconds = sum(getattr(p, "last_prefill_seconds", 0.0) for p in ran)
        out = []
        for i in range(len(batch)):
            trees = [trees[i] for trees in per_proposer]
            live = [(p, t) for p, t in zip(self.proposers, trees, strict=True) if len(t)]
            if len(live) <= 1:
                if not live:
                    out.append(TokenTree.empty())
                else:  # one proposer's tree: credited to it unless it names its own origins
                    proposer, tree = live[0]
                    out.append(tree if tree.origins is not None
                               else dataclasses.replace(tree, origins=((proposer.name,),) * len(tree)))
                continue
            merged, origins = merge_trees_with_origins([t for _, t in live])
            names = []
            for sources in origins:
                found: set[str] = set()
                for t, node in sources:
                    proposer, tree = live[t]
                    found.update(tree.origins[node] if tree.origins is not None else (proposer.name,))
                names.append(tuple(sorted(found)))
            out.append(TokenTree(merged.tokens, merged.parents, merged.probs, None, tuple(names)))
        return out
