"""StateStore: request state, idempotent round commits, heartbeats, drafter scores and stream work queues in Redis.

Every write that must be atomic is one Lua script; see keys.py for the key schema.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from specfleet.state import lua
from specfleet.state.keys import DEFAULT_PREFIX, Keys, check_name, check_score_field, glob_escape, pack_ids, unpack_ids

RUNNING, FINISHED, FAILED = "running", "finished", "failed"
_PAYLOAD_FIELD = b"d"


class RequestNotFoundError(LookupError):
    """The request id has no state in Redis (never created, deleted, or expired)."""


class RequestIdReuseError(ValueError):
    """A request id was reused for a different prompt or different params."""


class RoundGapError(ValueError):
    """A commit named a round after the next one to commit: an earlier round was never committed."""


@dataclass(frozen=True)
class RequestState:
    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    round: int
    status: str
    params: dict[str, Any]
    finish_reason: str = ""
    owner: str = ""
    created_ms: int = 0
    updated_ms: int = 0
    round_offsets: list[int] = field(default_factory=list)  # round_offsets[r]: index in output_ids where r started

    @property
    def done(self) -> bool:
        return self.status != RUNNING

    def round_tokens(self, round_index: int) -> list[int]:
        """The tokens committed by round `round_index` (a retried commit can compare its own tokens with these)."""
        if not 0 <= round_index < self.round:
            raise IndexError(f"round {round_index} not committed (request {self.rid} has {self.round} rounds)")
        start = self.round_offsets[round_index]
        end = self.round_offsets[round_index + 1] if round_index + 1 < self.round else len(self.output_ids)
        return self.output_ids[start:end]


class CommitResult:
    """A commit's outcome: "applied" | "retry" (that round was already committed) | "closed" (request finished or
    failed), and the request's state after it. The state is parsed from Redis' reply only when read: a round's
    commit that applied (every round but a retry's) never needs it."""

    __slots__ = ("applied", "outcome", "_rid", "_flat", "_state")

    def __init__(self, applied: bool, outcome: str, rid: str = "", flat: Sequence[bytes] | None = (),
                 state: RequestState | None = None):
        self.applied, self.outcome = applied, outcome
        self._rid, self._flat, self._state = rid, flat, state

    @property
    def state(self) -> RequestState:
        if self._state is None:
            if self._flat is None:
                raise LookupError(f"request {self._rid!r}: this commit applied without reading the state back "
                                  "(StateStore.commit_and_answer); read it with StateStore.get")
            self._state = _state_from_hash(self._rid, _hash_from_flat(self._flat))
        return self._state

    def __repr__(self) -> str:
        return f"CommitResult(applied={self.applied}, outcome={self.outcome!r}, state={self.state!r})"


def _decode(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _hash_from_flat(flat: Sequence[bytes]) -> dict[str, bytes]:
    return {_decode(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def _state_from_hash(rid: str, h: Mapping[str, bytes]) -> RequestState:
    return RequestState(
        rid=rid,
        prompt_ids=unpack_ids(h.get("prompt")),
        output_ids=unpack_ids(h.get("output")),
        round=int(h.get("round", b"0")),
        status=_decode(h.get("status")),
        params=json.loads(h.get("params") or b"{}"),
        finish_reason=_decode(h.get("finish_reason")),
        owner=_decode(h.get("owner")),
        created_ms=int(h.get("created", b"0")),
        updated_ms=int(h.get("updated", b"0")),
        round_offsets=unpack_ids(h.get("offsets")),
    )


def _canonical_params(params: Mapping[str, Any]) -> str:
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    try:
        return json.dumps(dict(params), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"params must be JSON-serialisable without NaN/inf: {exc}") from None


def _stream_entries(entries: Iterable[Any]) -> list[tuple[str, bytes]]:
    """(id, payload) pairs from parsed stream entries; entries deleted while pending (no fields) are skipped."""
    out = []
    for entry_id, fields in entries:
        if entry_id is not None and fields:
            out.append((_decode(entry_id), fields.get(_PAYLOAD_FIELD, b"")))
    return out


class StateStore:
    """Async facade over one `redis.asyncio.Redis` client (created with decode_responses=False) and one key prefix."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str = DEFAULT_PREFIX,
        finished_ttl_s: int = 3600,
        running_ttl_s: int | None = 86400,
    ):
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("StateStore needs a Redis client with decode_responses=False (token ids are bytes)")
        if finished_ttl_s < 1 or (running_ttl_s is not None and running_ttl_s < 1):
            raise ValueError("TTLs must be at least 1 second (running_ttl_s=None keeps running requests forever)")
        self.redis = redis
        self.keys = Keys(prefix)
        self.finished_ttl_s = int(finished_ttl_s)
        self.running_ttl_s = int(running_ttl_s or 0)
        self._create = redis.register_script(lua.CREATE_REQUEST)
        self._commit = redis.register_script(lua.COMMIT_ROUND)
        self._commit_answer = redis.register_script(lua.COMMIT_AND_ANSWER)
        self._fail = redis.register_script(lua.FAIL_REQUEST)
        self._score = redis.register_script(lua.UPDATE_SCORE)
        self._groups: set[tuple[str, str]] = set()

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """True when Redis answers within timeout_s; never raises for a connection problem."""
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), timeout_s))
        except (TimeoutError, RedisError, OSError):
            return False

    async def server_time_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # ---- requests -------------------------------------------------------------------------------------------

    async def create_request(
        self, rid: str, prompt_ids: Sequence[int], params: Mapping[str, Any], owner: str = ""
    ) -> RequestState:
        """Create a running request, or return the existing state unchanged (a retried Generate resumes it).

        Raises RequestIdReuseError when rid exists with another prompt or other params."""
        key = self.keys.request(rid)
        prompt, params_json = pack_ids(prompt_ids), _canonical_params(params)
        created, flat = await self._create(keys=[key], args=[prompt, params_json, owner, self.running_ttl_s])
        state = _state_from_hash(rid, _hash_from_flat(flat))
        if not created:
            if state.prompt_ids != unpack_ids(prompt):
                raise RequestIdReuseError(
                    f"request id {rid!r} is already used by a request with another prompt "
                    f"({len(state.prompt_ids)} tokens stored, {len(prompt) // 4} given): use a new request id"
                )
            if state.params != json.loads(params_json):
                raise RequestIdReuseError(
                    f"request id {rid!r} is already used by a request with other params "
                    f"(stored {state.params}, given {json.loads(params_json)}): use a new request id"
                )
        return state

    async def get(self, rid: str) -> RequestState | None:
        h = await self.redis.hgetall(self.keys.request(rid))
        return _state_from_hash(rid, {_decode(k): v for k, v in h.items()}) if h else None

    async def commit_round(
        self, rid: str, round: int, tokens: Sequence[int], finished: bool = False, finish_reason: str = ""
    ) -> CommitResult:
        """Append `tokens` as round `round`, atomically and idempotently.

        Applies only when `round` is the next round to commit. A retry of a committed round returns applied=False
        with outcome "retry" (compare tokens with `state.round_tokens(round)`); a request already finished or failed
        returns outcome "closed". Raises RoundGapError for a round beyond the next one, RequestNotFoundError when
        the request has no state."""
        reply = await self._commit(keys=[self.keys.request(rid)], args=self._commit_args(round, tokens, finished,
                                                                                  finish_reason))
        return self._commit_result(rid, round, reply)

    async def commit_and_answer(
        self, rid: str, round: int, tokens: Sequence[int], finished: bool, finish_reason: str, name: str, group: str,
        entry_id: str, reply_name: str, payload: bytes, reply_ttl_s: int = 600, reply_maxlen: int = 100_000
    ) -> CommitResult:
        """`commit_round`, and when it applies, the stream job `entry_id`'s answer too (`ack_and_send`), in one
        script: one Redis round trip for the round's commit and its answer. An applied result carries no state
        (nothing is read back); for any other outcome nothing is answered or acknowledged, and the result is
        `commit_round`'s (the caller answers with the committed round or the error)."""
        keys = [self.keys.request(rid), self.keys.stream(name), self.keys.stream(reply_name)]
        check_name("group", group)
        args = [*self._commit_args(round, tokens, finished, finish_reason), group, entry_id, bytes(payload),
                int(reply_ttl_s), int(reply_maxlen)]
        return self._commit_result(rid, round, await self._commit_answer(keys=keys, args=args))

    def _commit_args(self, round: int, tokens: Sequence[int], finished: bool, finish_reason: str) -> list:
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        return [int(round), pack_ids(tokens), "1" if finished else "0", finish_reason, self.finished_ttl_s,
                self.running_ttl_s]

    @staticmethod
    def _commit_result(rid: str, round: int, reply: Sequence) -> CommitResult:
        outcome = _decode(reply[0])
        if outcome == "missing":
            raise RequestNotFoundError(f"request {rid!r} has no state in Redis (never created, deleted or expired)")
        result = CommitResult(applied=outcome == "applied", outcome=outcome, rid=rid,
                              flat=reply[1] if len(reply) > 1 else None)
        if outcome == "gap":
            raise RoundGapError(
                f"request {rid!r}: commit of round {round} but only {result.state.round} rounds are committed "
                f"(the next commit must be round {result.state.round})"
            )
        return result

    async def fail(self, rid: str, reason: str) -> RequestState | None:
        """Mark a running request failed (finished_ttl_s applies); a finished or failed one is left as it is."""
        flat = await self._fail(keys=[self.keys.request(rid)], args=[reason, self.finished_ttl_s])
        return _state_from_hash(rid, _hash_from_flat(flat)) if flat else None

    async def delete(self, rid: str) -> bool:
        return bool(await self.redis.delete(self.keys.request(rid)))

    # ---- heartbeats -----------------------------------------------------------------------------------------

    async def heartbeat(self, role: str, pod: str, load: Mapping[str, Any], ttl_s: float = 10) -> dict[str, Any]:
        """Publish a pod's load (queue depth, NVML readings or {"gpu": None}, ...) for ttl_s seconds.

        Returns the record as readers will see it; its `draining` is true when the pod or the operator set it."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        record = dict(load)
        record.update(role=role, pod=pod, ts_ms=await self.server_time_ms(), ttl_s=ttl_s)
        record["draining"] = bool(load.get("draining", False))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.heartbeat(role, pod), json.dumps(record), px=max(1, int(ttl_s * 1000)))
            pipe.exists(self.keys.draining(role, pod))
            _, drain_flag = await pipe.execute()
        record["draining"] = record["draining"] or bool(drain_flag)
        return record

    async def heartbeats(self, role: str | None = None) -> list[dict[str, Any]]:
        """Live heartbeats (of one role, or all), each with role, pod, age_s and draining; sorted by role, pod."""
        keys = [key async for key in self.redis.scan_iter(match=self.keys.heartbeat_pattern(role), count=500)]
        if not keys:
            return []
        names = [self.keys.parse_heartbeat(_decode(key)) for key in keys]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.mget(keys)
            pipe.mget([self.keys.draining(r, p) for r, p in names])
            pipe.time()
            values, drain_flags, (seconds, micros) = await pipe.execute()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        out = []
        for (pod_role, pod), value, drain_flag in zip(names, values, drain_flags, strict=True):
            if value is None:  # expired between SCAN and MGET
                continue
            record = json.loads(value)
            record.update(role=pod_role, pod=pod, age_s=max(0, now_ms - int(record.get("ts_ms", now_ms))) / 1000)
            record["draining"] = bool(record.get("draining")) or drain_flag is not None
            out.append(record)
        return sorted(out, key=lambda r: (r["role"], r["pod"]))

    async def withdraw_heartbeat(self, role: str, pod: str) -> None:
        """Deletes a pod's heartbeat at once (a clean stop) instead of letting it expire."""
        await self.redis.delete(self.keys.heartbeat(role, pod))

    async def set_draining(self, role: str, pod: str, draining: bool, ttl_s: int = 3600) -> None:
        """Mark a pod draining (kept ttl_s seconds, across its heartbeats) or clear the mark."""
        key = self.keys.draining(role, pod)
        if draining:
            await self.redis.set(key, b"1", ex=int(ttl_s))
        else:
            await self.redis.delete(key)

    # ---- drafter scores -------------------------------------------------------------------------------------

    async def update_score(self, key: str, drafter: str, value: float, smoothing: float = 0.2) -> float:
        """EMA update, atomic: new = value for the first sample, else (1 - smoothing) * old + smoothing * value."""
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if not math.isfinite(value):
            raise ValueError(f"score value must be finite, got {value}")
        score_field = check_score_field(key, drafter)
        text = await self._score(keys=[self.keys.scores()], args=[score_field, repr(float(value)), repr(smoothing)])
        return float(text)

    async def scores(self, key: str) -> dict[str, float]:
        """{drafter: score} for one domain or request key."""
        head = check_score_field(key, "x")[:-1]
        out = {}
        async for name, value in self.redis.hscan_iter(self.keys.scores(), match=glob_escape(head) + "*", count=500):
            name = _decode(name)
            if name.startswith(head) and "|" not in name[len(head) :]:
                out[name[len(head) :]] = float(value)
        return out

    # ---- stream work queues ---------------------------------------------------------------------------------

    async def enqueue(self, name: str, payload: bytes) -> str:
        """Append a job; returns its stream id."""
        return _decode(await self.redis.xadd(self.keys.stream(name), {_PAYLOAD_FIELD: bytes(payload)}))

    async def _ensure_group(self, key: str, group: str, force: bool = False) -> None:
        if (key, group) in self._groups and not force:
            return
        try:
            await self.redis.xgroup_create(key, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add((key, group))

    async def consume(
        self, name: str, group: str, consumer: str, count: int = 1, block_ms: int | None = None
    ) -> list[tuple[str, bytes]]:
        """Up to `count` new jobs for `consumer` (creating the group if missing); they stay pending until acked.

        block_ms: wait up to that long for a job; None or <= 0 returns at once (never blocks forever)."""
        key = self.keys.stream(name)
        check_name("group", group)
        check_name("consumer", consumer)
        await self._ensure_group(key, group)
        block = int(block_ms) if block_ms and block_ms > 0 else None
        try:
            reply = await self.redis.xreadgroup(group, consumer, {key: ">"}, count=count, block=block)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._ensure_group(key, group, force=True)  # the stream was deleted since the group was made
            reply = await self.redis.xreadgroup(group, consumer, {key: ">"}, count=count, block=block)
        streams = reply.values() if isinstance(reply, dict) else [entries for _, entries in reply or []]
        jobs = []
        for entries in streams:  # RESP3 wraps each stream's entries in one more list
            entries = entries[0] if entries and isinstance(entries[0], list) else entries
            jobs.extend(_stream_entries(entries))
        return jobs

    async def ack(self, name: str, group: str, ids: Sequence[str]) -> int:
        """Acknowledge finished jobs and delete them from the stream; returns how many were pending."""
        if not ids:
            return 0
        key = self.keys.stream(name)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(key, group, *ids)
            pipe.xdel(key, *ids)
            acked, _ = await pipe.execute()
        return int(acked)

    async def ack_and_send(self, name: str, group: str, ids: Sequence[str], reply_name: str, payload: bytes,
                           reply_ttl_s: int = 600, reply_maxlen: int = 100_000) -> None:
        """Answer a job on its reply stream and acknowledge (delete) it, in one transaction: a job is never acked
        without its answer, nor answered twice by one consumer. Reply streams expire when nobody reads them."""
        key, reply_key = self.keys.stream(name), self.keys.stream(reply_name)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(reply_key, {_PAYLOAD_FIELD: bytes(payload)}, maxlen=reply_maxlen, approximate=True)
            pipe.expire(reply_key, reply_ttl_s)
            if ids:
                pipe.xack(key, group, *ids)
                pipe.xdel(key, *ids)
            await pipe.execute()

    async def in_line(self, name: str, group: str, entry_id: str) -> bool:
        """Whether a job is still in the stream and no consumer of `group` has taken it yet: waiting its turn (an
        answered job is deleted; a taken one is pending)."""
        key = self.keys.stream(name)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xrange(key, entry_id, entry_id, count=1)
            pipe.xpending_range(key, group, min=entry_id, max=entry_id, count=1)
            found, taken = await pipe.execute()
        return bool(found) and not taken

    async def keep_claims(self, name: str, group: str, consumer: str, ids: Sequence[str]) -> None:
        """Resets the idle time of jobs `consumer` holds (XCLAIM ... JUSTID to itself): a busy consumer's jobs are
        not reclaimed by others; a dead or stopped one's go idle and are."""
        if ids:
            await self.redis.xclaim(self.keys.stream(name), group, consumer, 0, list(ids), justid=True)

    async def requeue(self, name: str, group: str, jobs: Sequence[tuple[str, bytes]]) -> None:
        """Hands jobs a consumer took back to the group as new entries (a draining consumer's), in one
        transaction: each job is in the stream exactly once, and the next free consumer takes it."""
        key = self.keys.stream(name)
        async with self.redis.pipeline(transaction=True) as pipe:
            for _, payload in jobs:
                pipe.xadd(key, {_PAYLOAD_FIELD: bytes(payload)})
            ids = [i for i, _ in jobs]
            pipe.xack(key, group, *ids)
            pipe.xdel(key, *ids)
            await pipe.execute()

    async def take(self, name: str, count: int = 100, block_ms: int | None = None) -> list[tuple[str, bytes]]:
        """Reads and deletes up to `count` entries of a stream that has one reader (a router's reply stream);
        block_ms: wait up to that long for one (None or <= 0: return at once)."""
        jobs = await self.read_after(name, "0-0", count, block_ms)
        await self.delete_entries(name, [i for i, _ in jobs])
        return jobs

    async def read_after(self, name: str, after: str, count: int = 100, block_ms: int | None = None,
                         delete: Sequence[str] = ()) -> list[tuple[str, bytes]]:
        """Up to `count` entries of a stream newer than the id `after` ("0-0": from the start), left in the stream;
        block_ms: wait up to that long for one (None or <= 0: return at once). `delete`: entries read before (ids up
        to `after`) deleted first, in the same round trip (a reader that deletes what it has handled)."""
        key = self.keys.stream(name)
        block = int(block_ms) if block_ms and block_ms > 0 else None
        if delete:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xdel(key, *delete)
                pipe.xread({key: after}, count=count, block=block)
                _, reply = await pipe.execute()
        else:
            reply = await self.redis.xread({key: after}, count=count, block=block)
        streams = reply.values() if isinstance(reply, dict) else [entries for _, entries in reply or []]
        jobs = []
        for entries in streams:
            entries = entries[0] if entries and isinstance(entries[0], list) else entries
            jobs.extend(_stream_entries(entries))
        return jobs

    async def delete_entries(self, name: str, ids: Sequence[str]) -> None:
        if ids:
            await self.redis.xdel(self.keys.stream(name), *ids)

    async def reclaim(
        self, name: str, group: str, consumer: str, min_idle_ms: int, count: int = 10
    ) -> list[tuple[str, bytes]]:
        """Move up to `count` jobs pending longer than min_idle_ms (a dead consumer's) to `consumer` (XAUTOCLAIM)."""
        key = self.keys.stream(name)
        check_name("group", group)
        check_name("consumer", consumer)
        jobs: list[tuple[str, bytes]] = []
        cursor: bytes | str = "0-0"
        deleted = False
        while len(jobs) < count:
            try:
                reply = await self.redis.xautoclaim(
                    key, group, consumer, int(min_idle_ms), start_id=cursor, count=count - len(jobs)
                )
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    return []
                raise
            cursor = reply[0]
            deleted = deleted or any(entry_id is None or not fields for entry_id, fields in reply[1])
            jobs.extend(_stream_entries(reply[1]))
            if _decode(cursor) == "0-0":
                break
        if deleted:
            await self._ack_deleted(key, group)
        return jobs

    async def _ack_deleted(self, key: str, group: str, limit: int = 1000) -> int:
        """Acknowledges pending entries whose stream entry is gone (a job its router withdrew after a consumer had
        taken it, and that consumer died): nobody can run them. Redis 7 drops them from the pending list in
        XAUTOCLAIM; Redis 6.2 (the bundled redis-server) returns each as (nil, nil) without its id and keeps it
        pending for ever, one more in XPENDING and in the queue stats each time. Returns how many were acked."""
        pending = await self.redis.xpending_range(key, group, min="-", max="+", count=limit)
        return len(await self._gone(key, group, [_decode(p["message_id"]) for p in pending]))

    async def withdrawn(self, name: str, group: str, ids: Sequence[str]) -> list[str]:
        """Of `ids` (jobs a consumer holds), those whose stream entry is gone: their producer withdrew them (its
        caller went away) or another consumer finished them. They are acknowledged here, so they leave the pending
        list; the consumer may drop their work."""
        return await self._gone(self.keys.stream(name), group, list(ids))

    async def _gone(self, key: str, group: str, ids: list[str]) -> list[str]:
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xrange(key, min=entry_id, max=entry_id, count=1)
            found = await pipe.execute()
        gone = [entry_id for entry_id, entries in zip(ids, found, strict=True) if not entries]
        if gone:
            await self.redis.xack(key, group, *gone)
        return gone

    async def queue_stats(self, name: str, group: str) -> dict[str, int]:
        """depth: jobs not yet delivered; pending: delivered, not acked; oldest_age_ms: age of the oldest job not
        acked (0 when none). Ages use the Redis server clock."""
        key = self.keys.stream(name)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(key)
            pipe.xpending(key, group)
            pipe.xrange(key, count=1)
            pipe.time()
            length, pending_info, oldest, now = await pipe.execute(raise_on_error=False)
        for reply in (length, now):
            if isinstance(reply, Exception):
                raise reply
        pending = 0 if isinstance(pending_info, Exception) else int(pending_info["pending"])
        oldest_age_ms = 0
        if oldest and not isinstance(oldest, Exception):
            entry_ms = int(_decode(oldest[0][0]).split("-")[0])
            oldest_age_ms = max(0, int(now[0]) * 1000 + int(now[1]) // 1000 - entry_ms)
        return {"depth": max(0, int(length) - pending), "pending": pending, "oldest_age_ms": oldest_age_ms}

    # ---- housekeeping ---------------------------------------------------------------------------------------

    async def purge(self) -> int:
        """Delete every key under this store's prefix (a test's or a retired release's); returns how many."""
        removed = 0
        batch: list[bytes] = []
        async for key in self.redis.scan_iter(match=self.keys.everything_pattern(), count=1000):
            batch.append(key)
            if len(batch) >= 500:
                removed += await self.redis.unlink(*batch)
                batch.clear()
        if batch:
            removed += await self.redis.unlink(*batch)
        self._groups.clear()
        return removed
