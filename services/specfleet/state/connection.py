"""connect(): a validated `redis.asyncio.Redis` for the state store (redis://, rediss:// with TLS, unix://), and
resolve_redis_url(): where a process finds that URL (a flag, a mounted Secret file, or the environment)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis

_SCHEMES = ("redis", "rediss", "unix")
REDIS_URL_ENV, REDIS_URL_FILE_ENV = "SPECFLEET_REDIS_URL", "SPECFLEET_REDIS_URL_FILE"


def validate_redis_url(url: str) -> str:
    """The URL unchanged when it is a usable Redis URL; a ValueError that says what is wrong otherwise."""
    if not isinstance(url, str) or not url:
        raise ValueError("Redis URL is empty: use redis://[:password@]host[:port][/db] (rediss:// for TLS)")
    parts = urlsplit(url)
    shown = url if parts.password is None else url.replace(parts.password, "***", 1)
    if parts.scheme not in _SCHEMES:
        raise ValueError(
            f"Redis URL {shown!r} has scheme {parts.scheme or 'none'!r}: use redis://, rediss:// (TLS) or unix://"
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"Redis URL {shown!r} names no socket path: unix:///path/to/redis.sock")
        return url
    if not parts.hostname:
        raise ValueError(f"Redis URL {shown!r} names no host: redis://[:password@]host[:port][/db]")
    try:
        parts.port  # noqa: B018  (raises for a port that is not a number in range)
    except ValueError:
        raise ValueError(f"Redis URL {shown!r} has a bad port") from None
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"Redis URL {shown!r}: the path must be a database number, got {db!r}")
    return url


def resolve_redis_url(value: str | None, file: str | Path | None) -> str | None:
    """The Redis URL (it may carry a password) from `--redis-url` or `--redis-url-file`, else from the environment:
    `SPECFLEET_REDIS_URL_FILE` (a mounted Secret: what Kubernetes pods get) or `SPECFLEET_REDIS_URL`; None when
    none is given. A file holds the URL on its first non-blank line. Giving both a URL and a file is an error."""
    if not value and not file:
        value, file = os.environ.get(REDIS_URL_ENV), os.environ.get(REDIS_URL_FILE_ENV)
        if value and file:
            raise ValueError(f"both {REDIS_URL_ENV} and {REDIS_URL_FILE_ENV} are set: unset one")
    if value and file:
        raise ValueError("give --redis-url or --redis-url-file, not both")
    if not file:
        return value or None
    try:
        lines = [line.strip() for line in Path(file).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise ValueError(f"cannot read the Redis URL file {file}: {exc.strerror or exc}") from None
    if not lines:
        raise ValueError(f"the Redis URL file {file} is empty: write redis://[:password@]host[:port][/db] in it")
    try:
        return validate_redis_url(lines[0])
    except ValueError as exc:
        raise ValueError(f"the Redis URL file {file}: {exc}") from None


def connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio Redis client for `url` (password and db may be in the URL; TLS options such as ssl_ca_certs go
    in kwargs). Bytes replies (decode_responses=False) are forced: the state store keeps token ids as bytes.

    No I/O happens here; call it inside the event loop that will use the client and close it with `await aclose()`."""
    validate_redis_url(url)
    if kwargs.get("decode_responses"):
        raise ValueError("connect() makes clients with decode_responses=False: the state store needs bytes replies")
    kwargs["decode_responses"] = False
    # redis-py 8 gives up on a reply after 5 s. On a loaded node an event loop that is busy elsewhere (a verifier's
    # batch) reads late, and a timed-out commit fails its request back to the client, which then queues again: a soak
    # at 200 streams on 2 cores had 47 such retries in 4 minutes. Health does not wait on these: heartbeats carry
    # their own 2-s timeout, so an unreachable Redis still shows as NOT_SERVING at once.
    kwargs.setdefault("socket_timeout", 30.0)
    kwargs.setdefault("socket_connect_timeout", 10.0)
    kwargs.setdefault("socket_keepalive", True)
    kwargs.setdefault("health_check_interval", 30)
    # redis-py 8 caps an asyncio pool at 100 connections; a router with hundreds of live requests (and a verifier's
    # concurrent commits) needs more at once, and Redis itself allows 10,000 clients
    kwargs.setdefault("max_connections", 1024)
    return CancelSafeRedis.from_url(url, **kwargs)


class CancelSafeRedis(aioredis.Redis):
    """redis-py 8 can swallow a task's cancellation: cancelled while a command waits for its reply, the connection is
    dropped, the command retried on a new one and its reply returned as if nothing happened (about 1 cancel in 8 of a
    blocking XREAD on this machine). A service loop around such a call then never ends, and a server's stop (which
    cancels its heartbeat and its stream readers and waits for them) hangs. Here a command or pipeline that returns
    while a cancel of its task is pending raises CancelledError, as any other await in asyncio does."""

    async def execute_command(self, *args, **options):
        return await _cancel_safe(super().execute_command(*args, **options), args[0] if args else "command")

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> aioredis.client.Pipeline:
        return _CancelSafePipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class _CancelSafePipeline(aioredis.client.Pipeline):
    async def execute(self, raise_on_error: bool = True):
        return await _cancel_safe(super().execute(raise_on_error), "pipeline")


async def _cancel_safe(call, what):
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    result = await call
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError(f"cancelled during Redis {what!r} (redis-py retried it)")
    return result
