"""Redis state for the fleet: request state with idempotent round commits, heartbeats, drafter scores, work queues."""

from specfleet.state.connection import connect, resolve_redis_url, validate_redis_url
from specfleet.state.embedded import EmbeddedRedis, start_embedded_redis
from specfleet.state.keys import DEFAULT_PREFIX, Keys, pack_ids, unpack_ids
from specfleet.state.store import (
    FAILED,
    FINISHED,
    RUNNING,
    CommitResult,
    RequestIdReuseError,
    RequestNotFoundError,
    RequestState,
    RoundGapError,
    StateStore,
)

__all__ = [
    "DEFAULT_PREFIX",
    "FAILED",
    "FINISHED",
    "RUNNING",
    "CommitResult",
    "EmbeddedRedis",
    "Keys",
    "RequestIdReuseError",
    "RequestNotFoundError",
    "RequestState",
    "RoundGapError",
    "StateStore",
    "connect",
    "resolve_redis_url",
    "pack_ids",
    "start_embedded_redis",
    "unpack_ids",
    "validate_redis_url",
]
