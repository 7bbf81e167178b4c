"""Per-caller rate limits on the router: a token bucket of requests per second and one of generated tokens per
minute for each caller (keyed by its bearer token); a call over either limit is refused at once with
RESOURCE_EXHAUSTED and how long to wait. The bucket logic is pure (time is passed in); `RateLimit` is the gRPC
server interceptor that applies it to the router's generation methods."""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable

import grpc

LIMITED_METHODS = ("/specfleet.api.v1.Router/Generate", "/specfleet.api.v1.Router/Complete")


class TokenBucket:
    """Holds up to `capacity`, refills `rate` per second; the level may go below zero when usage is charged after
    the fact (generated tokens are only known as they stream), and then nothing is admitted until it refills."""

    def __init__(self, rate: float, capacity: float, now: float):
        if rate <= 0 or capacity <= 0:
            raise ValueError(f"a token bucket needs rate > 0 and capacity > 0, got {rate} and {capacity}")
        self.rate, self.capacity = float(rate), float(capacity)
        self.level, self.updated = float(capacity), now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0: now)."""
        self._refill(now)
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, amount: float, now: float) -> float:
        """Takes `amount` and returns 0 when the bucket holds it; otherwise takes nothing and returns the wait."""
        wait = self.wait_s(amount, now)
        if wait == 0.0:
            self.level -= amount
        return wait

    def charge(self, amount: float, now: float) -> None:
        """Takes `amount` unconditionally (usage already spent)."""
        self._refill(now)
        self.level -= amount

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.level >= self.capacity


class RateLimiter:
    """Buckets per caller: `rps` requests per second (bursts of up to max(1, rps)) and `tpm` generated tokens per
    minute (bursts of up to tpm); 0 turns a limit off. At most `max_callers` callers are tracked, the least recently
    seen forgotten first (callers are authenticated tokens, so in practice all of them fit)."""

    def __init__(self, rps: float = 0.0, tpm: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 max_callers: int = 10_000, max_requests: int = 100_000):
        if rps < 0 or tpm < 0 or not (math.isfinite(rps) and math.isfinite(tpm)):
            raise ValueError(f"rate limits must be finite numbers >= 0 (0: off), got rps={rps} tpm={tpm}")
        self.rps, self.tpm, self.clock, self.max_callers = float(rps), float(tpm), clock, max_callers
        self.max_requests = max_requests
        self._callers: OrderedDict[str, tuple[TokenBucket | None, TokenBucket | None]] = OrderedDict()
        # (caller, request id) -> completion tokens already charged: a resumed request replays what it has from
        # offset 0, and those tokens were paid for when they were generated
        self._charged: OrderedDict[tuple[str, str], int] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rps > 0 or self.tpm > 0

    def _buckets(self, key: str, now: float) -> tuple[TokenBucket | None, TokenBucket | None]:
        if key not in self._callers:
            self._callers[key] = (TokenBucket(self.rps, max(1.0, self.rps), now) if self.rps > 0 else None,
                                  TokenBucket(self.tpm / 60.0, self.tpm, now) if self.tpm > 0 else None)
            while len(self._callers) > self.max_callers:
                self._callers.popitem(last=False)
        self._callers.move_to_end(key)
        return self._callers[key]

    def admit(self, key: str) -> tuple[float, str]:
        """(0, "") when the caller may start a request now (one request is counted), else (seconds to wait, which
        limit)."""
        now = self.clock()
        requests, tokens = self._buckets(key, now)
        if tokens is not None:  # checked first: a refused call must not use up a request
            wait = tokens.wait_s(min(1.0, tokens.capacity), now)
            if wait > 0:
                return wait, f"{self.tpm:g} generated tokens per minute"
        if requests is not None:
            wait = requests.take(1.0, now)
            if wait > 0:
                return wait, f"{self.rps:g} requests per second"
        return 0.0, ""

    def charge(self, key: str, generated: int) -> None:
        """Counts tokens generated for the caller (called as they stream)."""
        if generated <= 0 or self.tpm <= 0:
            return
        now = self.clock()
        _, tokens = self._buckets(key, now)
        tokens.charge(generated, now)

    def charge_completion(self, key: str, request_id: str, end: int) -> None:
        """Counts a request's completion up to position `end` (a reply's offset + its tokens), charging only what
        this caller was not charged for before under this request id: replayed tokens of a resumed request are free.
        The least recently charged of `max_requests` requests are forgotten first."""
        if self.tpm <= 0:
            return
        if not request_id:
            self.charge(key, end)
            return
        slot = (key, request_id)
        before = self._charged.get(slot, 0)
        if end > before:
            self.charge(key, end - before)
            self._charged[slot] = end
        if slot in self._charged:
            self._charged.move_to_end(slot)
        while len(self._charged) > self.max_requests:
            self._charged.popitem(last=False)

    def __len__(self) -> int:
        return len(self._callers)


def caller_key(metadata, peer: str) -> str:
    """A caller's bucket key: a digest of its bearer token (the token itself is never kept or shown), or its
    address when it sent none (a router without auth)."""
    given = dict(metadata or ()).get("authorization", "")
    if given:
        return "token:" + hashlib.sha256(given.encode()).hexdigest()[:32]
    host = peer.rsplit(":", 1)[0] if peer else "unknown"
    return f"peer:{host}"


def _refusal(wait: float, which: str) -> tuple[str, tuple]:
    seconds = max(1, math.ceil(wait))
    return (f"rate limit of {which} for this caller exceeded; retry after {seconds} s",
            (("retry-after", str(seconds)),))


def _charge(limiter: RateLimiter, key: str, reply) -> None:
    """A reply's tokens, by their place in the completion (GenerateResponse.offset), so a replay is not paid twice."""
    tokens = len(getattr(reply, "token_ids", ()))
    if tokens:
        limiter.charge_completion(key, getattr(reply, "request_id", ""), getattr(reply, "offset", 0) + tokens)


class RateLimit(grpc.aio.ServerInterceptor):
    """Applies a RateLimiter to the router's generation calls; runs after the token check, so only callers with a
    valid token use up buckets. Generated tokens are counted from the replies' `token_ids` at their `offset`: the
tokens a resumed request replays were counted when they were generated (by this router replica)."""

    def __init__(self, limiter: RateLimiter, methods: tuple[str, ...] = LIMITED_METHODS):
        self.limiter, self.methods = limiter, methods

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method not in self.methods or handler.request_streaming:
            return handler
        limiter, metadata = self.limiter, details.invocation_metadata

        async def admit(context) -> str:
            key = caller_key(metadata, context.peer())
            wait, which = limiter.admit(key)
            if wait > 0:
                message, trailer = _refusal(wait, which)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailing_metadata=trailer)
            return key

        if handler.response_streaming:
            stream = handler.unary_stream

            async def limited_stream(request, context):
                key = await admit(context)
                async for message in stream(request, context):
                    _charge(limiter, key, message)
                    yield message

            return grpc.unary_stream_rpc_method_handler(limited_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        unary = handler.unary_unary

        async def limited(request, context):
            key = await admit(context)
            reply = await unary(request, context)
            _charge(limiter, key, reply)
            return reply

        return grpc.unary_unary_rpc_method_handler(limited, handler.request_deserializer, handler.response_serializer)
