"""The `head` drafter pool: the draft head (engine/head.py) as a service, with each request's target features kept
here. The router passes on the feature rows the verifier returned with each round (DraftItem.features: the rows it
has not sent this pool yet); this pool keeps them per request next to the tokens they are the features of. Where
the rows it holds and the rows a call carries do not cover context[:-1] with the very tokens of the context (a new
replica after a failover, a router restart, a gap, an evicted request) it rebuilds them with one target forward over
the context: the head shares the target's embedding and LM head, so the pod holds the target anyway. The head never
drafts from rows of other tokens than the context's."""

from __future__ import annotations

import dataclasses

import torch

from specfleet.engine.llama import KvLimits, common_prefix
from specfleet.engine.proposers import Draft
from specfleet.engine.tree import TokenTree
from specfleet.engine.verify import FeatureRows, TargetVerifier

REBUILD = "\x00rebuild"  # the rebuilder's one request id (never a router's: those are printable)


class HeadFeatures:
    """Per-request target features of a head pool: rows kept with their tokens, carried rows applied, gaps rebuilt."""

    def __init__(self, target, limits: KvLimits | None = None):
        # one slot: a rebuild is one prefill over one context, released at once
        self.rebuilder = TargetVerifier(target, slots=1, limits=limits, features=True)
        self.width = target.config.hidden_size
        self.dtype = self.rebuilder.runner.dtype
        self.device = self.rebuilder.runner.device  # rows carried over gRPC (host) are kept on the target's device
        self.held: dict[str, tuple[list[int], FeatureRows]] = {}
        self.rebuilds = 0  # requests whose features were rebuilt from the context (a counter for tests and heartbeats)
        self.carried_rows = 0  # rows taken from the router's calls

    def forget(self, rid: str) -> None:
        self.held.pop(rid, None)

    def cover(self, rid: str, context: list[int], carried: tuple[int, torch.Tensor] | None) -> torch.Tensor:
        """The target's features of context[:-1] ([len(context) - 1, H]): the rows held for the request's tokens, then
        the carried rows (first context position, [n, H]), then -- when they still fall short -- a rebuild."""
        want = len(context) - 1
        tokens, rows = self.held.get(rid) or ([], FeatureRows(self.width, self.dtype, self.device))
        keep = common_prefix(tokens, context[:want])  # rows of other tokens (a rewritten tail) are dropped
        rows.truncate(keep)
        if carried is not None:
            first, new = carried
            new = new[:max(0, want - first)]
            if first <= keep and first + len(new) > keep:  # contiguous with what is held: take them
                rows.truncate(first)
                rows.extend(new)
                keep = first + len(new)
                self.carried_rows += len(new)
        if keep < want:  # a gap: every row from one target forward over the context
            self.rebuilder.release(REBUILD)
            self.rebuilder.sync(REBUILD, context)
            rows = FeatureRows(self.width, self.dtype, self.device)
            rows.extend(self.rebuilder.features_of(REBUILD))
            self.rebuilder.release(REBUILD)
            keep = want
            self.rebuilds += 1
        self.held[rid] = (list(context[:keep]), rows)
        return rows.view()[:want]


class HeadPoolProposer:
    """The head proposer of a drafter pool: each Draft's `features` is what its call carried ((first, rows) or None);
    they become the features of context[:-1] (HeadFeatures) before the head drafts."""

    needs_features = True
    drafts_in_one_forward = True

    def __init__(self, head, features: HeadFeatures):
        self.head, self.features = head, features
        self.name = head.name
        self.drafters = head.drafters

    def start(self, rid: str, prompt: list[int]) -> None:
        pass

    def stop(self, rid: str, output: list[int]) -> None:
        self.features.forget(rid)
        self.head.stop(rid, output)

    def propose(self, batch: list[Draft]) -> list[TokenTree]:
        return self.head.propose([dataclasses.replace(d, features=self.features.cover(d.rid, d.context, d.features)
                                                      if len(d.context) >= 2 else None) for d in batch])
