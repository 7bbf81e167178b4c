"""Drafter servicer: concurrent Draft calls from many requests are drafted together in one batch; per-request
drafter state (KV cache, suffix tree) lives here and is rebuilt from the context a call carries when missing, so
any replica can serve any request."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc

from specfleet.api.v1 import internal_pb2, internal_pb2_grpc
from specfleet.engine.proposers import Draft, Proposer
from specfleet.runtime.server import Batcher, RecentRequests
from specfleet.runtime.wire import features_from_pb, sampling_from_pb, tree_to_pb


class DrafterService(internal_pb2_grpc.DrafterServicer):
    def __init__(self, proposer: Proposer, pool: str, capacity: int, max_k: int = 16, vocab_size: int = 1 << 31,
                 feature_width: int | None = None):
        """feature_width: a head pool's (the target's hidden size): the features a call carries go to the proposer."""
        self.proposer, self.pool, self.capacity = proposer, pool, capacity
        self.feature_width = feature_width
        self.max_k, self.vocab_size = max_k, vocab_size
        self.recent = RecentRequests()
        self.batcher = Batcher(self._draft_batch, max_batch=capacity, max_wait_s=0.0005)
        self.lock = threading.Lock()  # the proposer is used from the batch thread and from Release
        self.drafted = 0

    def _draft_batch(self, drafts: list[Draft]):
        self.recent.touch(d.rid for d in drafts)

        def release(rid: str) -> None:
            with self.lock:
                self.proposer.stop(rid, [])

        self.recent.evict(lambda: len(self.recent) > self.capacity, {d.rid for d in drafts}, release)
        start = time.perf_counter()
        with self.lock:
            trees = self.proposer.propose(drafts)
        seconds = time.perf_counter() - start
        self.drafted += sum(len(t) for t in trees)
        return [(tree, seconds) for tree in trees]

    def snapshot(self) -> dict:
        """Heartbeat counters: the batcher's, drafted tokens and cached requests (a head pool: feature rebuilds)."""
        extra = {}
        features = getattr(self.proposer, "features", None)
        if features is not None:
            extra = {"feature_rebuilds": features.rebuilds, "feature_rows_carried": features.carried_rows}
        return {**self.batcher.snapshot(), "tokens": self.drafted, "cached": len(self.recent), **extra}

    async def Draft(self, request: internal_pb2.DraftRequest, context) -> internal_pb2.DraftResponse:
        drafts = []
        for item in request.items:
            if not item.request_id:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "each draft item needs a request_id")
            if not item.context:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {item.request_id}: empty context")
            if not 0 <= item.k <= self.max_k:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k must be in [0, {self.max_k}], got {item.k}")
            if min(item.context) < 0 or max(item.context) >= self.vocab_size:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"request {item.request_id}: token ids must be in [0, {self.vocab_size})")
            params, seed = None, None
            if item.HasField("sampling") and item.sampling.temperature > 0:
                try:
                    params = sampling_from_pb(item.sampling)
                except ValueError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {item.request_id}: {exc}")
                seed = params.seed  # None (no seed): argmax drafts, which acceptance handles as well
            if item.position < 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"request {item.request_id}: position must be >= 0, got {item.position}")
            carried = None
            if self.feature_width is not None and item.HasField("features"):
                try:
                    carried = (item.features.first, features_from_pb(item.features, self.feature_width))
                except ValueError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {item.request_id}: {exc}")
            drafts.append(Draft(item.request_id, list(item.context), item.k, None, params, seed, item.position,
                                features=carried))
        results = await asyncio.gather(*(self.batcher.submit(d) for d in drafts))
        seconds = max((s for _, s in results), default=0.0)
        return internal_pb2.DraftResponse(trees=[tree_to_pb(t) for t, _ in results], drafter=self.pool, seconds=seconds)

    async def Release(self, request: internal_pb2.ReleaseRequest, context) -> internal_pb2.ReleaseResponse:
        self.recent.forget(request.request_id)

        def stop():
            with self.lock:
                self.proposer.stop(request.request_id, list(request.output))

        await asyncio.to_thread(stop)
        return internal_pb2.ReleaseResponse()

