"""DSI speculation parallelism and the Redis-stream verify queue through the real fleet (two verifiers, real Redis,
gRPC on loopback): the round after the one being verified is verified concurrently on the context that assumes the
first accepts its most likely path; it is committed only when that assumption holds. Output stays the target's own:
greedy equal to its greedy decoding, sampled equal to plain decoding under the same seed. A round taken from the
stream by a verifier that then died is reclaimed by a live one."""

import asyncio
import time
import uuid

import grpc
import pytest

from specfleet.api.v1 import internal_pb2, router_pb2, router_pb2_grpc
from specfleet.bench.fleet_bench import delete_prefix
from specfleet.engine.sampling import SamplingParams
from specfleet.local.inprocess import LocalFleet
from specfleet.runtime.process import ServeOptions
from specfleet.runtime.wire import sampling_to_pb, tree_to_pb
from specfleet.state import StateStore, connect
from specfleet.verifier.queue import VERIFY_GROUP, VERIFY_STREAM, VerifyQueueClient

from .switches import SAMPLED, run_all

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module", params=["stream", "rpc"])
def fleet(request, models_dir):
    prefix = f"sftest-dsi-{uuid.uuid4().hex[:8]}"
    opts = ServeOptions(models_dir, redis_url=REDIS_URL, key_prefix=prefix, slots=8, heartbeat_s=0)
    with LocalFleet(opts, pools=("python", "suffix"), verifiers=2, verify_queue=request.param) as running:
        yield running
    delete_prefix(REDIS_URL, prefix)


def test_greedy_output_is_the_targets_with_speculation_parallelism(fleet, prompt_ids, greedy_refs):
    assert run_all(fleet.router_address, prompt_ids, None) == greedy_refs
    router = fleet.services["router"]
    assert router.speculated > 0, "no round was verified concurrently with the one before it"
    assert router.speculated_used > 0, "no concurrently verified round was committed"
    if fleet.verify_queue == "stream":
        jobs = [fleet.services[f"verifier-{i}"].consumer.jobs for i in range(2)]
        assert sum(jobs) >= router.rounds  # every round (and every speculation) went through the stream


def test_sampled_output_equals_plain_decoding_under_the_same_seed(fleet, prompt_ids, sampled_refs):
    assert run_all(fleet.router_address, prompt_ids, SAMPLED) == sampled_refs


def test_a_dead_verifiers_round_is_reclaimed_from_the_stream(fleet, prompt_ids):
    """A consumer takes a round and never answers (a verifier killed mid-round): a live verifier reclaims it after
    CLAIM_IDLE_MS and answers on the caller's reply stream; the round commits once."""
    if fleet.verify_queue != "stream":
        pytest.skip("reclaim is a property of the stream queue")
    prefix = fleet.opts.key_prefix

    async def scenario():
        store = StateStore(connect(REDIS_URL), prefix=prefix)
        try:
            rid = uuid.uuid4().hex
            ids = prompt_ids[0]
            await store.create_request(rid, ids, {"max_new_tokens": 4})
            request = internal_pb2.VerifyRequest(request_id=rid, round=0, context=ids, prompt_len=len(ids),
                                                 tree=tree_to_pb(_empty_tree()), sampling=sampling_to_pb(
                                                     SamplingParams()), max_new_tokens=4)
            client = VerifyQueueClient(store, name=f"test-{rid[:8]}")
            # park both live verifiers' readers behind a ghost that takes the job first
            job = internal_pb2.VerifyJob(request=request, reply_to=client.reply_to, job_id="ghost-job",
                                         deadline_ms=int((time.time() + 60) * 1000))
            client._waiting["ghost-job"] = future = asyncio.get_running_loop().create_future()
            key = store.keys.stream(VERIFY_STREAM)
            async with store.redis.pipeline(transaction=True) as pipe:  # the ghost takes it before blocked readers
                pipe.xadd(key, {"d": job.SerializeToString()})
                pipe.xreadgroup(VERIFY_GROUP, "ghost", {key: ">"}, count=1)
                entry, taken = await pipe.execute()
            assert taken, "the ghost consumer did not get the job"
            client._reader = asyncio.get_running_loop().create_task(client._read_loop())
            start = time.monotonic()
            reply = await asyncio.wait_for(future, 30)
            waited = time.monotonic() - start
            await client.close()
            assert reply.code == 0 and len(reply.response.token_ids) == 1
            state = await store.get(rid)
            assert state.round == 1 and state.output_ids == list(reply.response.token_ids)
            pending = await store.redis.xpending(store.keys.stream(VERIFY_STREAM), VERIFY_GROUP)
            assert int(pending["pending"]) == 0, f"entry {entry} still pending"
            return waited
        finally:
            await store.redis.aclose()

    waited = asyncio.run(scenario())
    assert waited < 30
    assert sum(fleet.services[f"verifier-{i}"].consumer.reclaimed for i in range(2)) >= 1


def _empty_tree():
    from specfleet.engine.tree import TokenTree

    return TokenTree.empty()


def test_admission_refuses_new_requests_while_the_verify_queue_is_behind(fleet, prompt_ids, greedy_refs):
    """Verifiers stalled (their stream readers stopped) and a round waiting longer than max_queue_wait_ms: a new
    request gets RESOURCE_EXHAUSTED at once, saying why; once the verifiers read again, requests are served."""
    if fleet.verify_queue != "stream":
        pytest.skip("admission by queue wait reads the stream queue")
    from specfleet.verifier.queue import VerifyConsumer

    router = fleet.services["router"]
    verifiers = [fleet.services[f"verifier-{i}"] for i in range(2)]
    for v in verifiers:
        fleet.run(v.consumer.stop())

    async def stale_round():
        store = StateStore(connect(REDIS_URL), prefix=fleet.opts.key_prefix)
        try:
            job = internal_pb2.VerifyJob(request=internal_pb2.VerifyRequest(request_id="stale"), reply_to="reply.none")
            await store.enqueue(VERIFY_STREAM, job.SerializeToString())
        finally:
            await store.redis.aclose()

    asyncio.run(stale_round())
    router.config.max_queue_wait_ms = 200
    try:
        deadline = time.monotonic() + 20
        while router.queue_stats["oldest_age_ms"] <= 200 and time.monotonic() < deadline:
            fleet.run(router.refresh_members())
            time.sleep(0.1)
        assert router.queue_stats["oldest_age_ms"] > 200, f"the stale round never read as waiting: {router.queue_stats}"

        async def refused():
            async with grpc.aio.insecure_channel(fleet.router_address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Complete(router_pb2.GenerateRequest(prompt_token_ids=prompt_ids[0], max_new_tokens=4),
                                        timeout=10)
                return info.value

        error = asyncio.run(refused())
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "verify queue" in error.details() and "retry later" in error.details()
    finally:
        for i, v in enumerate(verifiers):
            name = f"verifier-{i}"

            async def restart(v=v, name=name):
                v.consumer = VerifyConsumer(v, v.store, f"{name}-again", capacity=8).start()

            fleet.run(restart())
        deadline = time.monotonic() + 20
        while router.queue_stats["oldest_age_ms"] > 200 and time.monotonic() < deadline:
            fleet.run(router.refresh_members())
            time.sleep(0.1)
        router.config.max_queue_wait_ms = 0
    assert router.queue_stats["oldest_age_ms"] <= 200  # the stale round was answered (NOT_FOUND) and removed
    assert run_all(fleet.router_address, prompt_ids[:1], None) == greedy_refs[:1]


def test_a_round_waiting_its_turn_keeps_its_place_past_the_rpc_timeout(fleet, prompt_ids, greedy_refs):
    """Overload: a round still in the stream when the router's rpc timeout passes is not lost, so it keeps its
    place (up to the caller's deadline) instead of failing the request back to the end of the line; a round a
    verifier took and never answered still fails at the timeout."""
    if fleet.verify_queue != "stream":
        pytest.skip("waiting in line is a property of the stream queue")
    from specfleet.verifier.queue import VerifyConsumer

    verifiers = [fleet.services[f"verifier-{i}"] for i in range(2)]

    async def stop():
        for v in verifiers:
            await v.consumer.stop()

    async def restart(tag: str):
        for i, v in enumerate(verifiers):
            v.consumer = VerifyConsumer(v, v.store, f"verifier-{i}-{tag}", capacity=8).start()

    fleet.run(stop())  # the verifiers are all busy: nobody reads the stream for a while
    ids = prompt_ids[2]

    async def scenario():
        store = StateStore(connect(REDIS_URL), prefix=fleet.opts.key_prefix)
        client = VerifyQueueClient(store, name=f"test-{uuid.uuid4().hex[:8]}")
        try:
            def round0(rid):
                return internal_pb2.VerifyRequest(request_id=rid, round=0, context=ids, prompt_len=len(ids),
                                                  tree=tree_to_pb(_empty_tree()),
                                                  sampling=sampling_to_pb(SamplingParams()), max_new_tokens=4)

            rid = uuid.uuid4().hex
            await store.create_request(rid, ids, {"max_new_tokens": 4})
            waiting = asyncio.get_running_loop().create_task(client.verify(round0(rid), 0.5, wait_s=30))
            await asyncio.sleep(2.0)  # four timeouts' worth in line
            assert not waiting.done()
            await asyncio.to_thread(fleet.run, restart("line"))  # on the fleet's own loop
            reply = await asyncio.wait_for(waiting, 30)
            assert list(reply.token_ids) == greedy_refs[2][:1] and client.kept_place >= 3
            # taken and never answered (a ghost consumer, which keeps it claimed): fails at the timeout
            ghost = uuid.uuid4().hex
            await store.create_request(ghost, ids, {"max_new_tokens": 4})
            await asyncio.to_thread(fleet.run, stop())
            task = asyncio.get_running_loop().create_task(client.verify(round0(ghost), 0.5, wait_s=30))
            await asyncio.sleep(0.1)
            taken = await store.consume(VERIFY_STREAM, VERIFY_GROUP, "ghost", count=1)
            assert taken
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(task, 10)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "of taking it" in info.value.details()
            await store.ack(VERIFY_STREAM, VERIFY_GROUP, [taken[0][0]])
        finally:
            await client.close()
            await store.redis.aclose()

    try:
        asyncio.run(scenario())
    finally:
        fleet.run(restart("after"))
    assert run_all(fleet.router_address, prompt_ids[:1], None) == greedy_refs[:1]


def test_two_rounds_of_one_request_in_one_batch_are_verified_in_turn(fleet, prompt_ids, greedy_refs):
    """A round and the DSI round speculated after it can reach one verifier together: they share the request's KV
    slot, so the batch is split; each verdict equals the target's greedy continuation of its own context."""
    from specfleet.engine.tree import TokenTree
    from specfleet.engine.verify import VerifyItem

    verifier = fleet.services["verifier-0"]
    ids, want = prompt_ids[1], greedy_refs[1]
    rid = uuid.uuid4().hex
    items = [VerifyItem(rid, ids, TokenTree.chain(want[:3]), SamplingParams()),
             VerifyItem(rid, ids + want[:4], TokenTree.chain(want[4:7]), SamplingParams())]
    first, second = verifier._verify_batch(items)
    assert first[0].tokens == want[:4] and second[0].tokens == want[4:8]
    verifier.verifier.release(rid)
