"""Verification work through a Redis stream with a consumer group (`{prefix}:stream:verify`, group `verifiers`).

The router appends a `VerifyJob` per round and waits for the `VerifyReply` on its own reply stream. Every verifier
reads jobs while it holds fewer than its intake (`--verify-intake`), so a job waits in the stream rather than in one
verifier's memory: visible to the operator as queue depth, first come first served across verifiers. It answers and
acknowledges each job in one transaction (for a round that commits, in the commit's own script: one
Redis call commits, answers and acknowledges it), and reclaims jobs another verifier took and left unacknowledged for
`claim_idle_ms` (it died or hangs). Once a second it drops the jobs it holds whose entry the router deleted (the
router withdraws a round whose caller went away): a withdrawn round still waiting for its forward never runs. A
reclaimed round may be verified twice; the commit is idempotent per (request, round), so it commits once and both
answers carry the same tokens."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError

from specfleet.api.v1 import internal_pb2
from specfleet.runtime.telemetry import QueueSpan, SpanKind

log = logging.getLogger("specfleet.verifier.queue")
VERIFY_STREAM = "verify"  # the operator reads this stream's depth, pending count and oldest age
VERIFY_GROUP = "verifiers"
CLAIM_IDLE_MS = 3000  # a job taken this long ago and not acknowledged is another verifier's to take


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a Verify call would raise, so the router treats stream and gRPC verification alike."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class VerifyConsumer:
    """Feeds a VerifierService (`handle(request)`) from the verify stream."""

    def __init__(self, service, store, consumer: str, capacity: int, claim_idle_ms: int = CLAIM_IDLE_MS,
                 block_ms: int = 500):
        self.service, self.store, self.consumer = service, store, consumer
        self.capacity = max(1, capacity)
        self.claim_idle_ms, self.block_ms = claim_idle_ms, block_ms
        self.inflight: dict[str, asyncio.Task] = {}  # stream id -> job task
        self.jobs = self.reclaimed = self.expired = self.withdrawn = 0
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._stopping = False  # redis-py can turn a cancelled blocking read into a ConnectionError: loops check this
        self._taking = asyncio.Event()  # cleared while the pod drains: it finishes what it holds and takes nothing
        self._taking.set()

    def pause(self, paused: bool) -> None:
        """Draining: take no new or reclaimed jobs (the ones in hand finish); False takes jobs again."""
        if paused:
            self._taking.clear()
        else:
            self._taking.set()

    def start(self) -> VerifyConsumer:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_loop()), loop.create_task(self._reclaim_loop())]
        return self

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stops taking jobs, then lets the ones in hand finish (unfinished ones stay pending for another verifier)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.inflight:
            await asyncio.wait(list(self.inflight.values()), timeout=grace_s)

    async def _read_loop(self) -> None:
        while not self._stopping:
            await self._taking.wait()
            room = self.capacity - len(self.inflight)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                jobs = await self.store.consume(VERIFY_STREAM, VERIFY_GROUP, self.consumer, count=room,
                                                block_ms=self.block_ms)
            except (RedisError, OSError) as exc:  # Redis away: heartbeats flip health; keep trying
                log.warning("reading the verify stream failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if jobs and not self._taking.is_set():  # drained while the read was in flight: hand them back at once
                try:
                    await self.store.requeue(VERIFY_STREAM, VERIFY_GROUP, jobs)
                    continue
                except (RedisError, OSError) as exc:  # then do them: leaving them pending costs CLAIM_IDLE_MS
                    log.warning("handing verify jobs back failed: %s", exc)
            for entry_id, payload in jobs:
                self._spawn(entry_id, payload)

    async def _reclaim_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.claim_idle_ms / 3000)
            held = list(self.inflight)
            try:  # jobs in hand wait in a busy batcher: keep them ours while we live
                await self.store.keep_claims(VERIFY_STREAM, VERIFY_GROUP, self.consumer, held)
                # a job whose router withdrew it (its client went away, its speculation was not needed) is dropped:
                # one still waiting for a forward never runs (the batcher skips a cancelled call)
                for entry_id in await self.store.withdrawn(VERIFY_STREAM, VERIFY_GROUP, held):
                    task = self.inflight.get(entry_id)
                    if task is not None and not task.done():
                        self.withdrawn += 1
                        task.cancel()
            except (RedisError, OSError) as exc:
                log.warning("keeping verify jobs claimed failed: %s", exc)
            room = self.capacity - len(self.inflight)
            if room <= 0 or not self._taking.is_set():
                continue
            try:
                jobs = await self.store.reclaim(VERIFY_STREAM, VERIFY_GROUP, self.consumer, self.claim_idle_ms, room)
            except (RedisError, OSError) as exc:
                log.warning("reclaiming verify jobs failed: %s", exc)
                continue
            for entry_id, payload in jobs:
                if entry_id not in self.inflight:  # our own slow job comes back too: it is still in hand
                    self.reclaimed += 1
                    self._spawn(entry_id, payload)

    def _spawn(self, entry_id: str, payload: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._job(entry_id, payload))
        self.inflight[entry_id] = task

        def done(_):
            self.inflight.pop(entry_id, None)
            self._room.set()

        task.add_done_callback(done)

    async def _job(self, entry_id: str, payload: bytes) -> None:
        from specfleet.verifier.service import VerifyError

        try:
            job = internal_pb2.VerifyJob.FromString(payload)
        except DecodeError:
            log.warning("dropping verify job %s: not a VerifyJob", entry_id)
            await self.store.ack(VERIFY_STREAM, VERIFY_GROUP, [entry_id])
            return
        self.jobs += 1
        span = QueueSpan(SpanKind.CONSUMER, VERIFY_STREAM, job.request, dict(job.trace))
        code = grpc.StatusCode.OK
        if job.deadline_ms and time.time() * 1000 > job.deadline_ms:  # its caller gave up: no forward for nobody
            self.expired += 1
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            reply = internal_pb2.VerifyReply(job_id=job.job_id, code=code.value[0],
                                             message="the job's deadline passed before a verifier took it")
        else:
            answered = False

            async def commit_and_answer(rid, rnd, tokens, finished, reason, response):
                """The round's commit and, when it applies, this job's answer and ack: one Redis call."""
                nonlocal answered
                payload = internal_pb2.VerifyReply(job_id=job.job_id, response=response).SerializeToString()
                result = await self.store.commit_and_answer(rid, rnd, tokens, finished, reason, VERIFY_STREAM,
                                                            VERIFY_GROUP, entry_id, job.reply_to, payload)
                answered = result.applied
                return result

            try:
                waited = max(0.0, time.time() - int(entry_id.split("-")[0]) / 1000)  # the id is its XADD time (ms)
                reply = internal_pb2.VerifyReply(job_id=job.job_id, response=await self.service.handle(
                    job.request, waited, commit_and_answer))
                if answered:  # committed, answered and acknowledged in one go
                    span.end(reply.response, code)
                    return
            except VerifyError as exc:
                code = exc.code
                reply = internal_pb2.VerifyReply(job_id=job.job_id, code=exc.code.value[0], message=exc.message)
            except Exception as exc:  # noqa: BLE001  (answer, never leave the router waiting for a deadline)
                log.exception("verify job %s failed", entry_id)
                code = grpc.StatusCode.INTERNAL
                reply = internal_pb2.VerifyReply(job_id=job.job_id, code=code.value[0],
                                                 message=f"the verifier failed: {exc}")
        span.end(reply.response if not reply.code else None, code)
        for attempt in range(3):
            try:
                await self.store.ack_and_send(VERIFY_STREAM, VERIFY_GROUP, [entry_id], job.reply_to,
                                              reply.SerializeToString())
                return
            except (RedisError, OSError) as exc:  # unanswered, it stays pending and another verifier reclaims it
                log.warning("answering verify job %s failed (%s), try %d", entry_id, exc, attempt + 1)
                await asyncio.sleep(0.2 * (attempt + 1))


class VerifyQueueClient:
    """The router's side: `verify(request, timeout_s)` through the stream, answered on this router's reply stream."""

    def __init__(self, store, name: str | None = None, block_ms: int = 1000):
        self.store = store
        self.reply_to = f"reply.{name or uuid.uuid4().hex[:16]}"
        self.block_ms = block_ms
        self._waiting: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._closed = False
        self.kept_place = 0  # rounds that outlived timeout_s waiting their turn and kept their place

    async def verify(self, request: internal_pb2.VerifyRequest, timeout_s: float,
                     wait_s: float | None = None) -> internal_pb2.VerifyResponse:
        """The round's answer. `timeout_s` bounds the round once a verifier has taken it (a hung one's is reclaimed
        by another anyway); while it is still waiting its turn in the stream it is not lost, so it keeps its place
        for up to `wait_s` in all (the caller's own deadline), instead of failing and rejoining at the back."""
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        job_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self._waiting[job_id] = future
        span = QueueSpan(SpanKind.PRODUCER, VERIFY_STREAM, request)
        entry, code, failure, reply = None, None, None, None
        limit_s = max(timeout_s, wait_s or 0.0)
        give_up = time.monotonic() + limit_s
        try:
            job = internal_pb2.VerifyJob(request=request, reply_to=self.reply_to, job_id=job_id, trace=span.fields(),
                                         deadline_ms=int((time.time() + limit_s) * 1000))
            entry = await self.store.enqueue(VERIFY_STREAM, job.SerializeToString())
            chunk_s, waited_in_line, taken_late = timeout_s, False, False
            while reply is None:
                try:
                    reply = await asyncio.wait_for(asyncio.shield(future), chunk_s)
                except TimeoutError:
                    left = give_up - time.monotonic()
                    if left > 0 and await self._in_line(entry):
                        self.kept_place += 1
                        chunk_s, waited_in_line = min(timeout_s, left), True
                        continue
                    if waited_in_line and not taken_late:  # taken since the last look, under timeout_s ago: it
                        chunk_s, taken_late = timeout_s, True  # gets its full timeout_s from being taken
                        continue
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    raise _rpc_error(code, f"no verifier answered round {request.round} of {request.request_id} "
                                           f"within {timeout_s:g} s of taking it") from None
            code = _CODES.get(reply.code, grpc.StatusCode.UNKNOWN)
        except asyncio.CancelledError as exc:  # early cancellation: a job nobody took yet is withdrawn
            failure = exc
            if entry is not None:
                asyncio.get_running_loop().create_task(self._withdraw(entry))
            raise
        finally:
            self._waiting.pop(job_id, None)
            span.end(reply.response if reply is not None and not reply.code else None, code, failure)
        if reply.code:
            raise _rpc_error(code, reply.message)
        return reply.response

    async def _in_line(self, entry: str) -> bool:
        try:
            return await self.store.in_line(VERIFY_STREAM, VERIFY_GROUP, entry)
        except (RedisError, OSError):  # cannot tell: the round fails as a timeout and the client resumes
            return False

    async def _withdraw(self, entry: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.store.redis.xdel(self.store.keys.stream(VERIFY_STREAM), entry)

    async def _read_loop(self) -> None:
        # Replies are handed to their waiting rounds first and deleted from the stream after, with the next read (one
        # Redis round trip per wake-up: deleting first would put a round trip into every round, deleting apart one
        # more per wake-up); reads start after the last id seen
        last, handled = "0-0", []
        while not self._closed:
            try:
                entries = await self.store.read_after(self.reply_to, last, count=256, block_ms=self.block_ms,
                                                      delete=handled)
                handled = []
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:  # the waiting calls hit their deadlines if Redis stays away
                log.warning("reading verify replies failed: %s", exc)
                handled = []  # left behind, they expire with the stream (reply_ttl_s)
                await asyncio.sleep(0.2)
                continue
            if not entries:
                continue
            last = entries[-1][0]
            for _, payload in entries:
                try:
                    reply = internal_pb2.VerifyReply.FromString(payload)
                except DecodeError:
                    continue
                future = self._waiting.get(reply.job_id)
                if future is not None and not future.done():  # a reclaimed job's second answer finds no one
                    future.set_result(reply)
            handled = [i for i, _ in entries]

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


_CODES = {code.value[0]: code for code in grpc.StatusCode}
