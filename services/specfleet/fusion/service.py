"""Fusion servicer: CoSine-style merge of the drafts of several drafter pools into one prefix-deduplicated tree,
siblings ordered by confidence (the most confident candidate is tried first), every node credited to the pools
that proposed it (the router feeds that back into expertise routing)."""

from __future__ import annotations

import dataclasses

import grpc
import torch

from specfleet.api.v1 import internal_pb2, internal_pb2_grpc
from specfleet.engine.fusion import merge_trees_with_origins
from specfleet.engine.tree import TokenTree
from specfleet.runtime.wire import tree_from_pb, tree_to_pb


def fuse_drafts(trees: list[TokenTree], pools: list[str], max_nodes: int = 0) -> TokenTree:
    """Merged tree whose origins name the pools behind each node; cut to the max_nodes most confident nodes
    (a node is kept only with its parent, so the cut stays a tree)."""
    merged, origins = merge_trees_with_origins(trees)
    names = tuple(tuple(sorted({pools[t] for t, _ in origin})) for origin in origins)
    tree = dataclasses.replace(merged, origins=names)
    if max_nodes and len(tree) > max_nodes:
        kept = set(sorted(range(len(tree)), key=lambda i: (-float(tree.probs[i]), i))[:max_nodes])
        alive: list[int] = []  # topological order: one pass drops nodes whose parent was cut
        for i in range(len(tree)):
            p = int(tree.parents[i])
            if i in kept and (p < 0 or p in alive):
                alive.append(i)
        index = {old: new for new, old in enumerate(alive)}
        tree = TokenTree(tree.tokens[alive], torch.tensor([index.get(int(tree.parents[i]), -1) for i in alive],
                                                          dtype=torch.long, device="cpu"),
                         tree.probs[alive], None, tuple(names[i] for i in alive))
    return tree


class FusionService(internal_pb2_grpc.FusionServicer):
    def __init__(self, vocab_size: int | None = None):
        self.vocab_size = vocab_size
        self.fused = 0
        self.nodes = 0

    async def Fuse(self, request: internal_pb2.FuseRequest, context) -> internal_pb2.FuseResponse:
        if len(request.drafters) != len(request.drafts):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{len(request.drafts)} drafts but {len(request.drafters)} drafter names")
        try:
            trees = [tree_from_pb(t, self.vocab_size) for t in request.drafts]
            if any(t.draft_probs is not None for t in trees):
                raise ValueError("sampled drafts (draft_probs) cannot be fused losslessly; send deterministic drafts")
            tree = fuse_drafts(trees, list(request.drafters), request.max_nodes)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.fused += 1
        self.nodes += len(tree)
        return internal_pb2.FuseResponse(tree=tree_to_pb(tree))

    def snapshot(self) -> dict:
        """Heartbeat counters: fusions (steps) and fused tree nodes (tokens)."""
        return {"steps": self.fused, "tokens": self.nodes}
