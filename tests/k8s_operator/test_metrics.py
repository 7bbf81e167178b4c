"""Metrics from the real Redis at 127.0.0.1:6379 (a unique key prefix per test): heartbeats written through
StateStore, the drain mark merged in, the verifier queue's stream stats, and defensive reading of odd heartbeats."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from specfleet.state import StateStore, connect
from specfleet_operator.metrics import (
    VERIFIER_GROUP,
    VERIFIER_STREAM,
    PodLoad,
    aggregate,
    read_sample,
    verifier_queue_wait_ms,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


async def with_store(body):
    redis = connect(REDIS_URL)
    store = StateStore(redis, prefix=f"test-op-{uuid.uuid4().hex[:10]}")
    try:
        if not await store.ping():
            pytest.skip("no Redis at 127.0.0.1:6379 (start one: redis-server --daemonize yes)")
        return await body(store)
    finally:
        await store.purge()
        await redis.aclose()


GPU = {"util": 70.0, "mem_used_mb": 1000.0, "mem_total_mb": 4000.0, "power_w": 120.0}


def test_sample_from_redis_heartbeats_and_queue():
    async def body(store):
        await store.heartbeat("router", "router-a", {"live": 3, "inflight": 3, "acceptance": 2.5, "rounds_per_s": 10,
                                                     "busy_frac": 0.2, "gpu": None})
        await store.heartbeat("verifier", "verifier-a", {"inflight": 2, "queue_depth": 4, "busy_frac": 0.9,
                                                         "tokens_per_s": 300.0, "step_ms": 30.0, "gpu": GPU,
                                                         "queue_wait_ms": 40.0, "queue_wait_p99_ms": 90.0})
        await store.heartbeat("verifier", "verifier-b", {"inflight": 0, "busy_frac": 0.5, "tokens_per_s": 100.0,
                                                         "gpu": {**GPU, "util": 50.0}, "queue_wait_ms": 20.0,
                                                         "queue_wait_p99_ms": 60.0})
        await store.heartbeat("drafter", "drafter-py-a", {"pool": "python", "inflight": 1, "busy_frac": 0.4,
                                                          "tokens_per_s": 500.0, "step_ms": 2.0, "gpu": None})
        await store.heartbeat("drafter", "drafter-c-a", {"pool": "c", "busy_frac": 0.1, "gpu": None})
        await store.set_draining("verifier", "verifier-b", True)
        for payload in (b"a", b"b", b"c"):
            await store.enqueue(VERIFIER_STREAM, payload)
        await store.consume(VERIFIER_STREAM, VERIFIER_GROUP, "verifier-a", count=1)
        return await read_sample(store, time_s=123.0)

    sample = asyncio.run(with_store(body))
    assert sample.time_s == 123.0
    assert set(sample.roles) == {"router", "verifier", "drafter-python", "drafter-c"}
    verifier = sample.role("verifier")
    assert [p.pod for p in verifier.pods] == ["verifier-a", "verifier-b"]
    assert [p.draining for p in verifier.pods] == [False, True]  # the drain mark is merged by the store
    assert (verifier.inflight, verifier.queue_depth, verifier.tokens_per_s) == (2, 4, 400.0)
    assert verifier.gpu_util == 70.0 and verifier.utilization_percent == 70.0  # serving pods only
    assert verifier.queue_wait_ms == 40.0 and verifier.queue_wait_p99_ms == 90.0
    assert sample.role("drafter-python").utilization_percent == pytest.approx(40.0)  # no GPU: busy fraction
    assert (sample.queue.depth, sample.queue.pending) == (2, 1) and sample.queue.oldest_age_ms >= 0
    assert (sample.live_requests, sample.acceptance, sample.rounds_per_s) == (3, 2.5, 10.0)
    assert not sample.idle
    summary = verifier.summary()
    assert summary["serving"] == 1.0 and summary["queue_wait_p99_ms"] == 90.0


def test_the_queue_wait_is_raised_to_what_the_verify_stream_shows_now():
    # the verifier's last beat says 5 ms (it reports the rounds that started in its interval, and publishes late when
    # its forwards hold its event loop); a round delivered to it 300 ms ago is still not answered: it has waited at
    # least 300 - 2 x 30 ms (its own step and one batch before it), and the operator reads that at once
    async def body(store):
        await store.heartbeat("verifier", "verifier-a", {"inflight": 1, "busy_frac": 1.0, "step_ms": 30.0,
                                                         "queue_wait_ms": 5.0, "gpu": None})
        await store.enqueue(VERIFIER_STREAM, b"round")
        fresh = await read_sample(store, time_s=1.0)
        await store.consume(VERIFIER_STREAM, VERIFIER_GROUP, "verifier-a", count=1)
        await asyncio.sleep(0.3)
        return fresh, await read_sample(store, time_s=2.0)

    fresh, late = asyncio.run(with_store(body))
    assert fresh.queue.depth == 1 and verifier_queue_wait_ms(fresh) == 5.0  # younger than two steps: the beat stands
    assert late.queue.pending == 1 and late.queue.oldest_age_ms >= 300
    assert verifier_queue_wait_ms(late) == late.queue.oldest_age_ms - 60.0
    # no step measured yet (a fresh verifier's first forwards): the round's age is not told from its service time
    unmeasured = aggregate([{"role": "verifier", "pod": "v", "queue_wait_ms": 5.0, "step_ms": 0}],
                           {"depth": 0, "pending": 1, "oldest_age_ms": 900})
    assert verifier_queue_wait_ms(unmeasured) == 5.0
    # no verifier reports a wait (none beats yet): the oldest round's age, as before
    assert verifier_queue_wait_ms(aggregate([], {"depth": 1, "pending": 0, "oldest_age_ms": 80})) == 80.0
    assert verifier_queue_wait_ms(aggregate([], {"depth": 0, "pending": 0, "oldest_age_ms": 0})) is None


def test_empty_fleet_is_idle():
    sample = asyncio.run(with_store(read_sample))
    assert sample.roles == {} and sample.idle and sample.acceptance is None
    assert sample.role("verifier").utilization_percent == 0.0


def test_odd_heartbeats_read_as_zero_or_unknown():
    records = [
        {"role": "verifier", "pod": "v", "inflight": "lots", "busy_frac": 7, "tokens_per_s": float("nan"),
         "gpu": "none", "step_ms": 0},
        {"role": "drafter", "pod": "d"},  # no pool: counted under the component
        {"role": "verifier", "pod": "w", "load": {"inflight": 2, "queue_depth": 1}},  # nested load dict
        {"pod": "no-role"},
    ]
    sample = aggregate(records, {"depth": "x"}, 0.0)
    v, w = sample.role("verifier").pods
    assert (v.inflight, v.busy_frac, v.tokens_per_s, v.gpu_util, v.step_ms) == (0, 1.0, 0.0, None, None)
    assert (w.inflight, w.queue_depth) == (2, 1) and not w.idle
    assert set(sample.roles) == {"verifier", "drafter"} and sample.queue.depth == 0
    assert PodLoad.from_heartbeat({"pod": "x", "draining": True}).idle
