"""What the sync and asyncio clients share: result types, the error, request validation, the retry policy and the
stream cursor that turns replayed or resumed Generate streams into each token exactly once."""

from __future__ import annotations

import math
import random
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from specfleet.api.v1 import router_pb2
from specfleet.runtime.chat import check_messages
from specfleet.runtime.telemetry import with_trace_context

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_BACKOFF_S = 5.0  # cap of one wait between attempts
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

RETRYABLE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
})
# A connection reset mid-stream sometimes surfaces as INTERNAL or UNKNOWN rather than UNAVAILABLE.
_RESET_MARKERS = ("rst_stream", "stream removed", "connection reset", "socket closed", "goaway", "broken pipe")


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of a request; speculation counts are target forward passes (rounds) and drafted tokens."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @classmethod
    def from_proto(cls, usage: router_pb2.Usage) -> Usage:
        return cls(usage.prompt_tokens, usage.completion_tokens, usage.rounds, usage.draft_tokens,
                   usage.accepted_tokens)


@dataclass(frozen=True, slots=True)
class Chunk:
    """New text and tokens of a stream; `offset` is the position of token_ids[0] in the whole completion."""

    text: str
    token_ids: list[int]
    offset: int
    finished: bool
    finish_reason: str
    usage: Usage | None


@dataclass(frozen=True, slots=True)
class Completion:
    """The whole continuation of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage | None
    request_id: str
    attempts: int = 1  # calls it took: more than one when the SDK retried (resuming by request id)


class SpecfleetError(Exception):
    """A call failed: `code` is the gRPC status (grpc.StatusCode), `message` the server's own words."""

    def __init__(self, code: grpc.StatusCode, message: str, *, request_id: str = "", attempts: int = 1):
        self.code = code
        self.message = message
        self.request_id = request_id
        self.attempts = attempts
        note = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{code.name}: {message}{note}")


def is_retryable(code: grpc.StatusCode, details: str) -> bool:
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details.lower():
        return False  # our own message-size limit: retrying cannot help (raise max_message_mb instead)
    if code in RETRYABLE_CODES:
        return True
    lowered = details.lower()
    return code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and any(m in lowered for m in _RESET_MARKERS)


def backoff_delay(retry: int, backoff: float) -> float:
    """Seconds before retry number `retry` (0-based): exponential, capped, with jitter in its upper half."""
    ceiling = min(MAX_BACKOFF_S, backoff * 2**retry)
    return ceiling / 2 + random.uniform(0.0, ceiling / 2)


def rpc_error_parts(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    return code or grpc.StatusCode.UNKNOWN, details or ""


# ---------------------------------------------------------------- client options

@dataclass(frozen=True, slots=True)
class ClientOptions:
    """The constructor options of Client and AsyncClient, checked once."""

    target: str  # the first of targets
    token: str | None
    root_certificates: bytes | None
    tls: bool
    timeout: float | None
    retries: int
    backoff: float
    max_message_bytes: int
    targets: tuple[str, ...] = ()  # router replicas: a call that fails retries on the next one (rolling updates)

    @classmethod
    def build(cls, target, token, tls, root_certificates, timeout, retries, backoff, max_message_mb) -> ClientOptions:
        targets = (target,) if isinstance(target, str) else tuple(target) if isinstance(target, list | tuple) else ()
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"target must be 'host:port' or a list of them (router replicas), got {target!r}")
        if token is not None and (not isinstance(token, str) or not token or any(c in token for c in "\r\n")):
            raise ValueError("token must be a non-empty string without line breaks (it is sent as "
                             "'authorization: Bearer <token>')")
        if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a number of seconds > 0 (or None for no deadline), got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if not (isinstance(backoff, int | float) and backoff >= 0 and math.isfinite(backoff)):
            raise ValueError(f"backoff must be a number of seconds >= 0, got {backoff!r}")
        if not (isinstance(max_message_mb, int | float) and max_message_mb > 0):
            raise ValueError(f"max_message_mb must be > 0, got {max_message_mb!r}")
        pem = _read_root_certificates(root_certificates)
        return cls(targets[0], token, pem, bool(tls) or pem is not None, timeout, retries, float(backoff),
                   int(max_message_mb * 1024 * 1024), targets)

    def channel_options(self) -> list[tuple[str, object]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.primary_user_agent", "specfleet-sdk"),
            # Reconnect soon after a replica dies so that our retries find its replacement (default: 1 s, growing).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]

    def credentials(self) -> grpc.ChannelCredentials | None:
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates) if self.tls else None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """A call's metadata: the bearer token, plus the caller's W3C trace context when the caller has a current
        span (any OpenTelemetry tracer provider, or none), so the fleet's spans join the caller's trace."""
        return with_trace_context((("authorization", f"Bearer {self.token}"),) if self.token else ())


def _read_root_certificates(value) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str | Path):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"root_certificates: no PEM file at {path} (give the CA certificate's path or its bytes)")
        return path.read_bytes()
    raise ValueError(f"root_certificates must be PEM bytes or a file path, got {type(value).__name__}")


# ---------------------------------------------------------------- requests

def _strings(name: str, values) -> list[str]:
    if isinstance(values, str):
        values = (values,)
    out = list(values or ())
    for v in out:
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name} must be non-empty strings, got {v!r}")
    return out


def build_request(prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                  messages: Sequence[Mapping[str, str]] | None = None,
                  max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                  seed: int | None = None, stop: Sequence[str] = (), drafters: Sequence[str] = (),
                  ignore_eos: bool = False, request_id: str | None = None) -> router_pb2.GenerateRequest:
    """A checked GenerateRequest; raises ValueError naming what to fix. A missing request_id becomes a uuid4
    and a missing seed a random one, both fixed for every retry of the call, so a retry resumes the same request.
    `messages` (a conversation, instead of a prompt) is rendered by the router with the model's chat template."""
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    ids = list(prompt_token_ids or ())
    conversation = []
    if messages is not None:
        if prompt or ids:
            raise ValueError("give either messages or a prompt (prompt / prompt_token_ids), not both")
        conversation = check_messages(messages)
    elif not prompt and not ids:
        raise ValueError("the prompt is empty: give prompt='some text' or prompt_token_ids=[...]")
    if prompt and ids:
        raise ValueError("give either prompt or prompt_token_ids, not both")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= INT32_MAX:
            raise ValueError(f"prompt_token_ids must be token ids (integers >= 0), got {t!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= INT32_MAX:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, int | float) or not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, int | float) or not 0.0 < top_p <= 1.0:  # NaN fails the comparison too
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= INT32_MAX:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if seed is None:
        seed = secrets.randbits(63)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not INT64_MIN <= seed <= INT64_MAX:
        raise ValueError(f"seed must be a 64-bit integer, got {seed!r}")
    if request_id is None:
        request_id = uuid.uuid4().hex
    elif not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
    return router_pb2.GenerateRequest(
        request_id=request_id, prompt=prompt or "", prompt_token_ids=ids,
        messages=[router_pb2.ChatMessage(**m) for m in conversation], max_new_tokens=max_new_tokens,
        temperature=float(temperature), top_p=float(top_p), top_k=top_k, seed=seed, stop=_strings("stop", stop),
        drafters=_strings("drafters", drafters), ignore_eos=bool(ignore_eos))


def completion_from(response: router_pb2.GenerateResponse, request_id: str, attempts: int = 1) -> Completion:
    usage = Usage.from_proto(response.usage) if response.HasField("usage") else None
    return Completion(response.text, list(response.token_ids), response.finish_reason, usage,
                      response.request_id or request_id, attempts)


# ---------------------------------------------------------------- streams

class StreamCursor:
    """Follows one Generate request across attempts and hands out each token once, in order.

    A retry carries the same request_id; the router may replay from offset 0 or resume at any offset up to what
    was received where one of its earlier messages began or ended, with any chunking. Replayed tokens are checked
    against those delivered and dropped; text is cut at the same place by remembering the character position of
    each message boundary (the router's detokenisation is deterministic: equal token prefixes, equal text).
    """

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.token_ids: list[int] = []  # delivered to the caller
        self.chars = 0  # length of the text delivered to the caller
        self.finished = False
        self._boundaries: dict[int, int] = {0: 0}  # token offset where a message began or ended -> its character
        self._next: tuple[int, int] | None = None  # (token offset, character) where this attempt's next message starts

    def new_attempt(self) -> None:
        self._next = None

    def _data_loss(self, what: str) -> SpecfleetError:
        return SpecfleetError(grpc.StatusCode.DATA_LOSS, f"{what} (request_id {self.request_id}); the router must "
                              "replay a retried request from offset 0 or from a message boundary it sent before",
                              request_id=self.request_id)

    def accept(self, message: router_pb2.GenerateResponse) -> Chunk | None:
        """The chunk to give the caller for one received message, or None when it holds nothing new."""
        offset, ids, delivered = message.offset, list(message.token_ids), len(self.token_ids)
        if offset < 0 or offset > delivered:
            raise self._data_loss(f"the stream resumed at token {offset} but {delivered} tokens were received")
        overlap = ids[:max(0, delivered - offset)]
        if overlap != self.token_ids[offset:offset + len(overlap)]:
            raise self._data_loss(f"the replayed tokens from offset {offset} differ from those already received")
        new_ids = ids[len(overlap):]
        if self._next is not None and self._next[0] == offset:
            start = self._next[1]
        else:
            start = self._boundaries.get(offset)
        if start is None:
            if new_ids:
                raise self._data_loss(f"the stream resumed at token {offset}, where no earlier message began or "
                                      "ended, so its text cannot be aligned")
            new_text = ""  # wholly replayed; text alignment comes back at the next known boundary
        else:
            if start > self.chars:
                raise self._data_loss(f"the text resumed at character {start} but {self.chars} were received")
            end = start + len(message.text)
            self._boundaries.setdefault(offset, start)
            self._boundaries.setdefault(offset + len(ids), end)
            new_text = message.text[self.chars - start:] if end > self.chars else ""
            self.chars = max(self.chars, end)
        self._next = (offset + len(ids), start + len(message.text)) if start is not None else None
        self.token_ids.extend(new_ids)
        self.finished = message.finished
        if not (new_ids or new_text or message.finished):
            return None
        usage = Usage.from_proto(message.usage) if message.HasField("usage") else None
        return Chunk(new_text, new_ids, delivered, message.finished, message.finish_reason, usage)


class Attempts:
    """The retry budget of one call: `retries` failed attempts in a row are forgiven, with backoff between them.
    A stream attempt that delivered new tokens resets the count, since the next one resumes after them."""

    def __init__(self, retries: int, backoff: float, request_id: str):
        self.retries, self.backoff, self.request_id = retries, backoff, request_id
        self.made = 0  # attempts started
        self._failures = 0  # consecutive failed attempts without progress

    def start(self) -> None:
        self.made += 1

    def failed(self, code: grpc.StatusCode, details: str, *, progressed: bool = False) -> float:
        """Seconds to wait before the next attempt; raises SpecfleetError when the call must give up."""
        if progressed:
            self._failures = 0
        if not is_retryable(code, details) or self._failures >= self.retries:
            raise SpecfleetError(code, details, request_id=self.request_id, attempts=self.made)
        delay = backoff_delay(self._failures, self.backoff)
        self._failures += 1
        return delay


class Replicas:
    """Which router replica a call's attempts go to: calls start on the replicas in turn (spreading them), and each
    failed attempt moves on to the next replica (one that died or drains in a rolling update is left at once)."""

    def __init__(self, count: int):
        self.count, self._calls = count, 0

    def first(self) -> int:
        index = self._calls % self.count
        self._calls += 1
        return index


# A stream closed with OK before its finished message (say, a router shutting down) is resumed like a failover.
ENDED_EARLY = (grpc.StatusCode.UNAVAILABLE, "the stream ended before its finished message")
