"""What requests leave behind, through a real fleet (a suffix drafter and two verifiers, so DSI speculative rounds run
too; real gRPC on loopback; the real Redis under a fresh prefix). After completed, cancelled and failed requests
Redis holds no key without a TTL beyond the fleet's fixed ones (`state.census`) and the verify stream no pending or
waiting entry; a client that goes away stops all work for its request (drafting, rounds waiting in the verify stream,
verification) within 2 s, and the router forgets it."""

import time
import uuid

import grpc
import pytest

from specfleet.api.v1 import router_pb2, router_pb2_grpc
from specfleet.bench.reliability import purge
from specfleet.local.inprocess import LocalFleet
from specfleet.runtime.process import ServeOptions
from specfleet.state.census import FIXED_KINDS, census

REDIS_URL = "redis://127.0.0.1:6379/0"
LONG = dict(prompt_token_ids=[5, 6, 7], max_new_tokens=600, ignore_eos=True)  # far longer than any test waits


@pytest.fixture(scope="module")
def fleet(models_dir):
    prefix = f"sftest-leaks-{uuid.uuid4().hex[:8]}"
    opts = ServeOptions(models_dir, redis_url=REDIS_URL, key_prefix=prefix, slots=8)
    with LocalFleet(opts, pools=("suffix",), verifiers=2, fusion=False) as running:
        running.prefix = prefix
        yield running
    purge(REDIS_URL, prefix)


@pytest.fixture(scope="module")
def stub(fleet):
    with grpc.insecure_channel(fleet.router_address) as channel:
        yield router_pb2_grpc.RouterStub(channel)


def work_done(fleet) -> int:
    """Forwards run by every drafter and verifier so far."""
    return sum(service.batcher.batches for name, service in fleet.services.items() if name != "router")


def wait_quiet(fleet, timeout: float = 30.0) -> None:
    """Until no request is live and no drafter or verifier has worked for a second."""
    deadline = time.monotonic() + timeout
    last, since = work_done(fleet), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = work_done(fleet)
        if now != last:
            last, since = now, time.monotonic()
        elif fleet.services["router"].live == 0 and time.monotonic() - since > 1.0:
            return
    raise AssertionError("the fleet did not go quiet")


def cancel_after(stub, messages: int, rid: str) -> None:
    call = stub.Generate(router_pb2.GenerateRequest(request_id=rid, **LONG), timeout=120)
    for _ in range(messages):
        next(call)
    call.cancel()


def test_completed_cancelled_and_failed_requests_leave_no_orphans(fleet, stub):
    for i in range(3):
        reply = stub.Complete(router_pb2.GenerateRequest(prompt_token_ids=[5, 6, 7 + i], max_new_tokens=6),
                              timeout=120)
        assert reply.finish_reason
    for _ in range(2):
        cancel_after(stub, 2, f"leak-cancel-{uuid.uuid4().hex}")
    with pytest.raises(grpc.RpcError) as err:  # failed: the caller's deadline passes mid-generation
        stub.Complete(router_pb2.GenerateRequest(request_id=f"leak-late-{uuid.uuid4().hex}", **LONG), timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    rid = f"leak-reuse-{uuid.uuid4().hex}"
    stub.Complete(router_pb2.GenerateRequest(request_id=rid, prompt_token_ids=[5, 6], max_new_tokens=2), timeout=60)
    with pytest.raises(grpc.RpcError) as err:  # failed: the id reused for another prompt
        stub.Complete(router_pb2.GenerateRequest(request_id=rid, prompt_token_ids=[9, 9], max_new_tokens=2),
                      timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    wait_quiet(fleet)
    found = census(REDIS_URL, fleet.prefix)
    assert found["orphans"] == 0, found["orphan_keys"]
    assert set(found["without_ttl"]) <= set(FIXED_KINDS), found
    assert found["verify_pending"] == 0 and found["verify_undelivered"] == 0, found
    assert all(s["entries"] == 0 for kind, s in found["streams"].items() if kind == "stream:reply"), found
    assert found["requests"].get("finished", 0) >= 4
    # the cancelled and timed-out ones stay resumable by their id, bounded by the running TTL (checked above: every
    # request key has a TTL); nothing else is left running
    assert found["requests"].get("running", 0) <= 3
    assert not fleet.services["router"].controller.trackers  # the router kept no per-request state either


def test_a_client_that_goes_away_stops_its_work_within_2_s(fleet, stub):
    wait_quiet(fleet)
    rid = f"leak-gone-{uuid.uuid4().hex}"
    cancel_after(stub, 3, rid)
    cancelled = time.monotonic()
    time.sleep(2.0)
    router = fleet.services["router"]
    assert router.live == 0
    at_2s = work_done(fleet)
    found = census(REDIS_URL, fleet.prefix)
    assert found["verify_pending"] == 0 and found["verify_undelivered"] == 0, found
    time.sleep(2.0)
    assert work_done(fleet) == at_2s, "drafters or verifiers still worked for a request its client left 2 s ago"
    assert time.monotonic() - cancelled < 10


def test_the_census_counts_a_key_without_a_ttl_as_an_orphan(fleet):
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    key = f"{fleet.prefix}:req:orphan-{uuid.uuid4().hex}"
    client.hset(key, "status", "running")  # as a request created without its TTL would be
    try:
        found = census(REDIS_URL, fleet.prefix)
        assert found["orphans"] == 1 and found["orphan_keys"] == [key]
        assert found["without_ttl"]["req"] == 1
    finally:
        client.delete(key)
        client.close()


def test_a_withdrawn_job_whose_consumer_died_does_not_stay_pending():
    """A round the router withdrew (XDEL) after a verifier took it, and that verifier was killed: on the bundled Redis
    6.2, XAUTOCLAIM hands the entry back as (nil, nil) and kept it pending for ever (found by `bench reliability`'s
    census after the faults); the reclaim acknowledges it."""
    import asyncio

    from specfleet.bench.reliability import PersistentRedis
    from specfleet.state import StateStore, connect

    async def scenario(url: str) -> tuple[list, int, int]:
        client = connect(url)
        try:
            store = StateStore(client, prefix="sftest-withdrawn")
            await store.enqueue("verify", b"withdrawn")
            await store.enqueue("verify", b"live")
            taken = await store.consume("verify", "verifiers", "dead-verifier", count=2)
            await client.xdel(store.keys.stream("verify"), taken[0][0])  # the router withdraws the first
            await asyncio.sleep(0.05)
            jobs = await store.reclaim("verify", "verifiers", "live-verifier", min_idle_ms=10)
            pending = (await client.xpending(store.keys.stream("verify"), "verifiers"))["pending"]
            await store.ack("verify", "verifiers", [entry_id for entry_id, _ in jobs])
            after = (await client.xpending(store.keys.stream("verify"), "verifiers"))["pending"]
            return jobs, pending, after
        finally:
            await client.aclose()

    with PersistentRedis() as redis_server:  # the bundled redis-server (6.2), where the leak was
        jobs, pending, after = asyncio.run(scenario(redis_server.url))
    assert [payload for _, payload in jobs] == [b"live"]
    assert pending == 1 and after == 0


@pytest.mark.parametrize("bundled", [False, True], ids=["redis-7", "bundled-6.2"])
def test_a_verifier_finds_the_jobs_it_holds_that_were_withdrawn(bundled):
    """The verifier's once-a-second look: of the jobs it holds, the ones the router deleted since (withdrawn) are
    named and acknowledged, so it drops their work and they leave the pending list."""
    import asyncio

    from specfleet.bench.reliability import PersistentRedis
    from specfleet.state import StateStore, connect

    async def scenario(url: str) -> tuple[list, list, int]:
        client = connect(url)
        store = StateStore(client, prefix=f"sftest-withdraw-{uuid.uuid4().hex[:8]}")
        try:
            await store.enqueue("verify", b"left")
            await store.enqueue("verify", b"kept")
            held = [entry_id for entry_id, _ in await store.consume("verify", "verifiers", "v0", count=2)]
            await client.xdel(store.keys.stream("verify"), held[0])  # the router withdraws the first
            gone = await store.withdrawn("verify", "verifiers", held)
            pending = (await client.xpending(store.keys.stream("verify"), "verifiers"))["pending"]
            return held, gone, pending
        finally:
            await store.purge()
            await client.aclose()

    if bundled:
        with PersistentRedis() as redis_server:
            held, gone, pending = asyncio.run(scenario(redis_server.url))
    else:
        held, gone, pending = asyncio.run(scenario(REDIS_URL))
    assert gone == held[:1] and pending == 1
