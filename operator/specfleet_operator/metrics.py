"""One metrics sample of a fleet, read from Redis: each pod's heartbeat (load, NVML readings published by the pod
itself, so the operator needs no GPU library) aggregated per role key, plus the verifier work queue's stream stats.

`aggregate()` is pure (heartbeat dicts in, a `MetricsSample` out); `read_sample()` does the Redis reads through
`specfleet.state.StateStore`. Every heartbeat field is read defensively: a missing or malformed one counts as 0 or
"unknown", never as an error, so an older service version cannot stop the operator."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from specfleet_operator.spec import DRAFTER, ROUTER, VERIFIER, drafter_key

if TYPE_CHECKING:
    from specfleet.state import StateStore

VERIFIER_STREAM = "verify"  # the verifier work queue (`{p}:stream:verify`), when the fleet queues through Redis
VERIFIER_GROUP = "verifiers"


def _number(record: Mapping[str, Any], name: str) -> float | None:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _count(record: Mapping[str, Any], name: str) -> int:
    value = _number(record, name)
    return max(0, int(value)) if value is not None else 0


def _mean(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


@dataclass(frozen=True)
class PodLoad:
    """One pod's heartbeat, reduced to what scaling and draining need."""

    pod: str
    inflight: int = 0  # calls in progress
    queue_depth: int = 0
    draining: bool = False
    busy_frac: float = 0.0  # 0..1 over the pod's last heartbeat interval
    tokens_per_s: float = 0.0
    step_ms: float | None = None
    gpu_util: float | None = None  # percent; None: the pod has no GPU (or NVML failed there)
    gpu_mem_used_mb: float | None = None
    gpu_mem_total_mb: float | None = None
    power_w: float | None = None
    queue_wait_ms: float | None = None  # verifier only
    queue_wait_p99_ms: float | None = None
    age_s: float = 0.0

    @property
    def idle(self) -> bool:
        """No work in progress or queued: the pod can be removed without losing anything."""
        return self.inflight == 0 and self.queue_depth == 0

    @classmethod
    def from_heartbeat(cls, record: Mapping[str, Any]) -> PodLoad:
        nested = record.get("load")  # accept {"load": {...}} as well as the fields at the top level
        fields = {**nested, **record} if isinstance(nested, Mapping) else dict(record)
        gpu = fields.get("gpu") if isinstance(fields.get("gpu"), Mapping) else {}
        busy = _number(fields, "busy_frac")
        return cls(
            pod=str(fields.get("pod", "")),
            inflight=_count(fields, "inflight"),
            queue_depth=_count(fields, "queue_depth"),
            draining=bool(fields.get("draining", False)),
            busy_frac=min(1.0, max(0.0, busy)) if busy is not None else 0.0,
            tokens_per_s=max(0.0, _number(fields, "tokens_per_s") or 0.0),
            step_ms=_number(fields, "step_ms") or None,  # 0 means "no step measured yet"
            gpu_util=_number(gpu, "util"),
            gpu_mem_used_mb=_number(gpu, "mem_used_mb"),
            gpu_mem_total_mb=_number(gpu, "mem_total_mb"),
            power_w=_number(gpu, "power_w"),
            queue_wait_ms=_number(fields, "queue_wait_ms"),
            queue_wait_p99_ms=_number(fields, "queue_wait_p99_ms"),
            age_s=_number(fields, "age_s") or 0.0,
        )


@dataclass(frozen=True)
class RoleLoad:
    """The pods of one role key (router, fusion, verifier, drafter-<pool>) and their aggregate load. Rates and
    utilisation are averaged over serving (not draining) pods: a draining pod's idleness says nothing about load."""

    pods: tuple[PodLoad, ...] = ()

    @property
    def serving(self) -> tuple[PodLoad, ...]:
        return tuple(p for p in self.pods if not p.draining)

    @property
    def inflight(self) -> int:
        return sum(p.inflight for p in self.pods)

    @property
    def queue_depth(self) -> int:
        return sum(p.queue_depth for p in self.pods)

    @property
    def tokens_per_s(self) -> float:
        return sum(p.tokens_per_s for p in self.pods)

    @property
    def busy_frac(self) -> float:
        return _mean(p.busy_frac for p in self.serving) or 0.0

    @property
    def step_ms(self) -> float | None:
        return _mean(p.step_ms for p in self.serving)

    @property
    def gpu_util(self) -> float | None:
        return _mean(p.gpu_util for p in self.serving)

    @property
    def utilization_percent(self) -> float:
        """GPU utilisation where the pods report a GPU, else their busy fraction (CPU pods), in percent."""
        gpu = self.gpu_util
        return gpu if gpu is not None else 100.0 * self.busy_frac

    @property
    def queue_wait_ms(self) -> float | None:
        return _mean(p.queue_wait_ms for p in self.serving)

    @property
    def queue_wait_p99_ms(self) -> float | None:
        known = [p.queue_wait_p99_ms for p in self.pods if p.queue_wait_p99_ms is not None]
        return max(known) if known else None

    def summary(self) -> dict[str, float]:
        """The figures a scaling decision records (JSON-ready; unknown ones left out)."""
        out = {"pods": float(len(self.pods)), "serving": float(len(self.serving)), "inflight": float(self.inflight),
               "queue_depth": float(self.queue_depth), "busy_frac": round(self.busy_frac, 4),
               "tokens_per_s": round(self.tokens_per_s, 3), "utilization_percent": round(self.utilization_percent, 2)}
        for name in ("step_ms", "gpu_util", "queue_wait_ms", "queue_wait_p99_ms"):
            value = getattr(self, name)
            if value is not None:
                out[name] = round(value, 3)
        return out


@dataclass(frozen=True)
class QueueStats:
    depth: int = 0  # jobs not yet delivered
    pending: int = 0  # delivered, not acknowledged
    oldest_age_ms: int = 0


@dataclass(frozen=True)
class MetricsSample:
    time_s: float
    roles: Mapping[str, RoleLoad] = field(default_factory=dict)
    queue: QueueStats = field(default_factory=QueueStats)
    live_requests: int = 0  # requests the routers are serving
    acceptance: float | None = None  # mean accepted tokens per round, over routers
    rounds_per_s: float = 0.0

    def role(self, key: str) -> RoleLoad:
        return self.roles.get(key, RoleLoad())

    @property
    def idle(self) -> bool:
        """Nothing to do anywhere: no live request, no call in progress, nothing queued."""
        busy_roles = any(load.inflight or load.queue_depth for load in self.roles.values())
        return not (self.live_requests or busy_roles or self.queue.depth or self.queue.pending)


def role_key_of(record: Mapping[str, Any]) -> str:
    """The role key a heartbeat belongs to: its role, or `drafter-<pool>` for a drafter publishing its pool."""
    role = str(record.get("role", ""))
    pool = record.get("pool")
    if role == DRAFTER and isinstance(pool, str) and pool:
        return drafter_key(pool)
    return role


def aggregate(heartbeats: Iterable[Mapping[str, Any]], queue: Mapping[str, Any] | None = None,
              time_s: float | None = None) -> MetricsSample:
    """A MetricsSample from heartbeat records (as `StateStore.heartbeats()` returns them) and queue stats."""
    grouped: dict[str, list[PodLoad]] = {}
    routers: list[Mapping[str, Any]] = []
    for record in heartbeats:
        key = role_key_of(record)
        if not key:
            continue
        grouped.setdefault(key, []).append(PodLoad.from_heartbeat(record))
        if key == ROUTER:
            routers.append(record)
    queue = queue or {}
    return MetricsSample(
        time_s=time.time() if time_s is None else time_s,
        roles={key: RoleLoad(tuple(sorted(pods, key=lambda p: p.pod))) for key, pods in grouped.items()},
        queue=QueueStats(_count(queue, "depth"), _count(queue, "pending"), _count(queue, "oldest_age_ms")),
        live_requests=sum(_count(r, "live") for r in routers),
        acceptance=_mean(_number(r, "acceptance") for r in routers),
        rounds_per_s=sum(_number(r, "rounds_per_s") or 0.0 for r in routers),
    )


async def read_sample(store: StateStore, stream: str = VERIFIER_STREAM, group: str = VERIFIER_GROUP,
                      time_s: float | None = None) -> MetricsSample:
    """Read every heartbeat and the verifier queue's stats from Redis and aggregate them."""
    heartbeats = await store.heartbeats()
    queue = await store.queue_stats(stream, group)
    return aggregate(heartbeats, queue, time_s)


def verifier_queue_wait_ms(sample: MetricsSample) -> float | None:
    """Verifier queue wait: the mean the verifiers report, raised to what the verify stream shows now (its oldest
    round not yet answered, less two verifier steps: the batch it may have waited for and its own), else the age of
    the oldest queued job.

    A heartbeat reports the rounds that started in its interval, and a verifier whose forwards run on its event loop
    publishes late when it is outrun (its beats waited ~10 s in a burst on the local fleet): the stream's stats are
    read from Redis each control step, and a round that has waited there (or inside the verifier, delivered and not
    yet acknowledged) longer than two steps is a queue the next beat would only report later. At a load the
    verifiers keep up with, the oldest round is younger than two steps and the heartbeats' mean stands; so it does
    while no verifier has measured a step (its first forwards, slow, would read as a queue)."""
    verifiers = sample.role(VERIFIER)
    wait = verifiers.queue_wait_ms
    if sample.queue.depth or sample.queue.pending:
        if wait is None:
            return float(sample.queue.oldest_age_ms)
        if verifiers.step_ms is not None:  # no step measured yet (a fresh verifier's first, slow forwards): the
            # round's age cannot be told from its service time, and the heartbeat's figure stands
            wait = max(wait, float(sample.queue.oldest_age_ms) - 2.0 * verifiers.step_ms)
    return wait
