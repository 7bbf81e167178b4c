"""Verifier servicer: a batch scheduler over concurrent Verify calls (one target forward per batch), lossless
acceptance, and an atomic, idempotent commit of each round to Redis keyed by (request, round): a retried round is
answered from Redis and never commits twice."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import grpc
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from specfleet.api.v1 import internal_pb2, internal_pb2_grpc
from specfleet.engine.llama import KvLimits, common_prefix
from specfleet.engine.verify import TargetVerifier, Verdict, VerifyItem, cut_at_finish
from specfleet.runtime.server import Batcher, RecentRequests
from specfleet.runtime.wire import (
    DEFAULT_FEATURE_DTYPE,
    features_to_pb,
    replayed_round,
    sampling_from_pb,
    tree_from_pb,
)
from specfleet.state.store import RequestNotFoundError, RoundGapError


class VerifyError(Exception):
    """A round the verifier refuses, with the gRPC status a Verify call answers."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def stream_seed(rid: str) -> int:
    """The sampling seed of a request that gave none: a function of its id, so every replica and retry agrees."""
    return int.from_bytes(hashlib.sha256(rid.encode()).digest()[:8], "little") >> 1


class VerifierService(internal_pb2_grpc.VerifierServicer):
    def __init__(self, target, slots: int, store=None, eos_token_id: int | None = None, max_wait_s: float = 0.0005,
                 max_batch_tokens: int = 0, limits: KvLimits | None = None, features: bool = False,
                 feature_dtype: str = DEFAULT_FEATURE_DTYPE):
        """features: keep each request's target features, and return those a round added when its request asks
        (VerifyRequest.features: a router with a draft head pool), packed as `feature_dtype`."""
        self.verifier = TargetVerifier(target, slots=slots, limits=limits, features=features)
        self.feature_dtype = feature_dtype
        slots = self.verifier.runner.slots  # what the KV budget holds
        self.store = store
        self.eos_token_id = target.config.eos_token_id if eos_token_id is None else eos_token_id
        self.recent = RecentRequests()
        self.lock = threading.Lock()
        # batch scheduling: up to `slots` requests per forward, and (from the profiled cost model) at most
        # max_batch_tokens tokens, so one forward stays within its latency bound; 0: no token cap
        self.max_batch_tokens = max_batch_tokens
        self.batcher = Batcher(self._verify_batch, max_batch=slots, max_wait_s=max_wait_s,
                               weight=lambda item: len(item.tree) + 1, max_weight=max_batch_tokens)
        self.rounds = 0
        self.tokens = 0
        self.feature_rounds = 0  # rounds answered with features, and their bytes (the wire cost of a head pool)
        self.feature_bytes = 0
        self.consumer = None  # verifier.queue.VerifyConsumer, when rounds also come from the Redis stream

    def _verify_batch(self, items: list[VerifyItem]) -> list[tuple[Verdict, float, int, object]]:
        """One forward per group of items with distinct requests: two rounds of one request (a round and the DSI
        round speculated after it) share that request's KV slot, so they never go in one forward."""
        groups: list[list[int]] = []
        for i, item in enumerate(items):
            group = next((g for g in groups if all(items[j].rid != item.rid for j in g)), None)
            if group is None:
                groups.append(group := [])
            group.append(i)
        out: list[tuple[Verdict, float, int, object]] = [None] * len(items)  # type: ignore[list-item]
        for group in groups:
            for i, result in zip(group, self._forward_group([items[i] for i in group]), strict=True):
                out[i] = result
        return out

    def _forward_group(self, items: list[VerifyItem]) -> list[tuple[Verdict, float, int, object]]:
        """(verdict, forward seconds, batch size, features) per item; features: (first row, [rows, H] copy) of the rows
        this round added to the request's features (every row whose token prefix changed), or None when none are
        kept."""
        with self.lock:
            wanted = {it.rid for it in items}
            self.recent.touch(wanted)

            def full() -> bool:  # the batch's new requests need slots
                return len(self.verifier) + sum(r not in self.verifier for r in wanted) > self.verifier.runner.slots

            self.recent.evict(full, wanted, self.verifier.release)
            keep = self.verifier.keep_features
            before = {it.rid: (list(self.verifier.known[it.rid]), self.verifier.feats[it.rid].n)
                      for it in items if keep and it.rid in self.verifier}
            start = time.perf_counter()
            verdicts = self.verifier.verify(items)
            seconds = time.perf_counter() - start
            added: list[object] = [None] * len(items)
            if keep:
                for i, it in enumerate(items):
                    known, n = before.get(it.rid, ([], 0))
                    # a row stands while its token's prefix is unchanged: the first changed one is the first sent
                    first = min(n, common_prefix(known, self.verifier.known[it.rid]))
                    added[i] = (first, self.verifier.features_of(it.rid)[first:].clone())
        self.rounds += len(items)
        self.tokens += sum(len(it.tree) + 1 for it in items)
        return [(v, seconds, len(items), f) for v, f in zip(verdicts, added, strict=True)]

    def snapshot(self) -> dict:
        """Heartbeat counters: the batcher's (forwards, busy time, queue wait), verified tokens, cached requests."""
        stream = {}
        if self.consumer is not None:
            stream = {"stream_jobs": self.consumer.jobs, "stream_reclaimed": self.consumer.reclaimed,
                      "stream_expired": self.consumer.expired, "stream_withdrawn": self.consumer.withdrawn}
        return {**self.batcher.snapshot(), "tokens": self.tokens, "rounds": self.rounds, "cached": len(self.recent),
                "feature_rounds": self.feature_rounds, "feature_bytes": self.feature_bytes, **stream}

    async def Verify(self, request: internal_pb2.VerifyRequest, context) -> internal_pb2.VerifyResponse:
        try:
            return await self.handle(request)
        except VerifyError as exc:
            await context.abort(exc.code, exc.message)

    async def handle(self, request: internal_pb2.VerifyRequest, waited_s: float = 0.0,
                     commit_and_answer=None) -> internal_pb2.VerifyResponse:
        """One round, from a Verify call or a stream job (`waited_s` in the stream): validate, verify (batched),
        commit unless speculative. Raises VerifyError with the status a Verify call answers. A request with
        `sent_unix` gets the round's timings in its answer (profiling: `specfleet bench fleet --stages overhead`).
        `commit_and_answer(rid, round, tokens, finished, reason, response)` (a stream job's): commits the round and,
        when that applies, answers it with `response` in the same Redis call (StateStore.commit_and_answer); it
        returns the CommitResult, so a round committed before is answered as from commit_round. The answer is then
        built before the commit: its timings count the commit in the answer's way back (`commit_s` 0)."""
        picked = time.perf_counter()
        timed = request.sent_unix > 0
        queue_s = max(0.0, time.time() - request.sent_unix) if timed else 0.0
        rid, rnd = request.request_id, request.round
        context_ids = list(request.context)
        vocab = self.verifier.vocab_size
        try:
            if not rid:
                raise ValueError("request_id is required")
            if not context_ids or min(context_ids) < 0 or max(context_ids) >= vocab:
                raise ValueError(f"context must be non-empty token ids in [0, {vocab})")
            if not 0 < request.prompt_len <= len(context_ids):
                raise ValueError(f"prompt_len must be in [1, {len(context_ids)}], got {request.prompt_len}")
            if request.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens (tokens left) must be >= 1, got {request.max_new_tokens}")
            tree = tree_from_pb(request.tree, vocab)
            if len(context_ids) + tree.max_depth + 1 > self.verifier.max_positions:
                raise ValueError(f"context ({len(context_ids)}) + tree depth exceeds the model's context of "
                                 f"{self.verifier.max_positions}")
            params = sampling_from_pb(request.sampling)
        except ValueError as exc:
            raise VerifyError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        seed = params.seed if params.seed is not None else stream_seed(rid)
        item = VerifyItem(rid, context_ids, tree, params, len(context_ids) - request.prompt_len, seed)
        submitted = time.perf_counter()
        verdict, seconds, batch, added = await self.batcher.submit(item, waited_s)
        verified = time.perf_counter()
        tokens, reason = cut_at_finish(verdict.tokens, request.max_new_tokens, self.eos_token_id, request.ignore_eos)
        finished = bool(reason)
        accepted = min(len(verdict.path), len(tokens))
        reply = internal_pb2.VerifyResponse(request_id=rid, round=rnd, token_ids=tokens, accepted=accepted,
                                            accepted_nodes=verdict.path[:accepted], seconds=seconds, batch=batch,
                                            finished=finished, finish_reason=reason)
        if request.features and added is not None and not finished:
            # rows up to the context and the accepted nodes; a round cut at the finish needs none (no next draft)
            first, rows = added
            reply.features.CopyFrom(features_to_pb(rows, first, self.feature_dtype))
        if timed:
            reply.timings.queue_s = queue_s
            reply.timings.batch_wait_s = max(0.0, verified - submitted - seconds)
        committing = self.store is not None and not request.speculative
        built = time.perf_counter()
        if committing and commit_and_answer is not None and timed:  # the answer leaves with the commit
            reply.timings.handle_s = time.perf_counter() - picked
        if committing:
            # No read before the forward (it would cost a Redis round trip per round): the commit itself says
            # whether this round was already committed (a retry), and then the committed tokens stand.
            try:
                if commit_and_answer is not None:
                    result = await commit_and_answer(rid, rnd, tokens, finished, reason, reply)
                else:
                    result = await self.store.commit_round(rid, rnd, tokens, finished=finished, finish_reason=reason)
            except RequestNotFoundError as exc:
                raise VerifyError(grpc.StatusCode.NOT_FOUND, str(exc)) from None
            except RoundGapError as exc:
                raise VerifyError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
            except (RedisConnectionError, RedisTimeoutError) as exc:  # retryable: the round was not committed here
                raise VerifyError(grpc.StatusCode.UNAVAILABLE, f"the state store (Redis) is unreachable ({exc}); "
                                                               "the round was not committed, retry it") from None
            if not result.applied:
                if rnd < result.state.round:
                    return replayed_round(result.state, rnd)
                raise VerifyError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"request {rid} is already {result.state.status}")
        committed = time.perf_counter()
        if reply.HasField("features"):
            self.feature_rounds += 1
            self.feature_bytes += len(reply.features.data)
        if timed and (commit_and_answer is None or not committing):
            reply.timings.commit_s = committed - built
            reply.timings.handle_s = time.perf_counter() - picked
        return reply

    async def Release(self, request: internal_pb2.ReleaseRequest, context) -> internal_pb2.ReleaseResponse:
        def release():
            with self.lock:
                self.recent.forget(request.request_id)
                self.verifier.release(request.request_id)

        await asyncio.to_thread(release)
        return internal_pb2.ReleaseResponse()
