"""The Redis state store against a real Redis (127.0.0.1:6379, else an embedded one), each test under its own prefix."""

import asyncio
import os
import socket
import time
import uuid

import pytest
import redis
import redis.asyncio

from specfleet.state import (
    RequestIdReuseError,
    RequestNotFoundError,
    RoundGapError,
    StateStore,
    connect,
    start_embedded_redis,
)
from specfleet.state.keys import Keys

PARAMS = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 7, "max_new_tokens": 32, "stop": [], "drafters": []}


@pytest.fixture(scope="module")
def redis_url():
    url = os.environ.get("SPECFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(url, socket_connect_timeout=1, retry=None)
    try:
        reachable = client.ping()
    except (redis.RedisError, OSError):
        reachable = False
    finally:
        client.close()
    if reachable:
        yield url
    else:
        with start_embedded_redis() as server:  # no local Redis: a real one all the same
            yield server.url


@pytest.fixture
def prefix(redis_url):
    prefix = f"sftest-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def run(redis_url, prefix, body, **store_kwargs):
    """Run `body(store)` in a fresh event loop with a fresh client (asyncio clients belong to one loop)."""

    async def main():
        client = connect(redis_url)
        try:
            return await body(StateStore(client, prefix=prefix, **store_kwargs))
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_create_is_idempotent_and_refuses_reuse_of_a_request_id(redis_url, prefix):
    async def body(store):
        first = await store.create_request("req-1", [1, 2, 3], PARAMS, owner="router-a")
        assert (first.prompt_ids, first.output_ids, first.round, first.status) == ([1, 2, 3], [], 0, "running")
        assert first.params == PARAMS and first.owner == "router-a" and first.created_ms > 0
        await store.commit_round("req-1", 0, [9, 9])
        again = await store.create_request("req-1", [1, 2, 3], dict(reversed(PARAMS.items())), owner="router-b")
        assert again.output_ids == [9, 9] and again.round == 1 and again.owner == "router-a"  # unchanged, not reset
        with pytest.raises(RequestIdReuseError, match="another prompt"):
            await store.create_request("req-1", [1, 2, 4], PARAMS)
        with pytest.raises(RequestIdReuseError, match="other params"):
            await store.create_request("req-1", [1, 2, 3], {**PARAMS, "seed": 8})
        assert await store.get("nope") is None
        assert await store.delete("req-1") and await store.get("req-1") is None
        assert not await store.delete("req-1")
        with pytest.raises(ValueError, match="request id"):
            await store.create_request("has space", [1], PARAMS)

    run(redis_url, prefix, body)


def test_commit_is_idempotent_and_records_round_offsets(redis_url, prefix):
    async def body(store):
        await store.create_request("r", [5], PARAMS)
        assert (await store.commit_round("r", 0, [10, 11, 12])).applied
        assert (await store.commit_round("r", 1, [])).applied  # a round may commit nothing new
        done = await store.commit_round("r", 2, [13], finished=True, finish_reason="length")
        assert done.applied and done.outcome == "applied"
        state = done.state
        assert state.output_ids == [10, 11, 12, 13] and state.round == 3 and state.round_offsets == [0, 3, 3]
        assert [state.round_tokens(r) for r in range(3)] == [[10, 11, 12], [], [13]]
        assert (state.status, state.finish_reason, state.done) == ("finished", "length", True)
        retry = await store.commit_round("r", 0, [10, 11, 12])
        assert not retry.applied and retry.outcome == "retry" and retry.state == state
        assert retry.state.round_tokens(0) == [10, 11, 12]
        closed = await store.commit_round("r", 3, [14])
        assert not closed.applied and closed.outcome == "closed" and closed.state.output_ids == state.output_ids
        assert await store.get("r") == state

    run(redis_url, prefix, body)


def test_concurrent_commits_of_one_round_apply_exactly_once(redis_url, prefix):
    async def body(store):
        await store.create_request("race", [1], PARAMS)
        results = await asyncio.gather(*(store.commit_round("race", 0, [100 + i, 200 + i]) for i in range(20)))
        winners = [i for i, result in enumerate(results) if result.applied]
        assert len(winners) == 1
        expected = [100 + winners[0], 200 + winners[0]]
        assert all(result.state.output_ids == expected and result.state.round == 1 for result in results)

        async def replica(rounds):  # two verifier replicas racing through the same ten rounds
            applied = 0
            for r in rounds:
                applied += (await store.commit_round("race", r, [r, r])).applied
            return applied

        counts = await asyncio.gather(replica(range(1, 11)), replica(range(1, 11)))
        assert sum(counts) == 10
        state = await store.get("race")
        assert state.output_ids == expected + [t for r in range(1, 11) for t in (r, r)] and state.round == 11

    run(redis_url, prefix, body)


def test_commit_gap_and_missing_request_raise(redis_url, prefix):
    async def body(store):
        await store.create_request("g", [1], PARAMS)
        with pytest.raises(RoundGapError, match="round 2 but only 0 rounds"):
            await store.commit_round("g", 2, [1])
        with pytest.raises(RequestNotFoundError):
            await store.commit_round("missing", 0, [1])
        with pytest.raises(ValueError, match="int32"):
            await store.commit_round("g", 0, [2**31])
        assert (await store.get("g")).output_ids == []

    run(redis_url, prefix, body)


def test_ttls_running_finished_and_failed(redis_url, prefix):
    async def body(store):
        key = store.keys.request
        await store.create_request("a", [1], PARAMS)
        assert 100 < await store.redis.ttl(key("a")) <= 200
        await store.commit_round("a", 0, [2], finished=True, finish_reason="eos")
        assert 10 < await store.redis.ttl(key("a")) <= 60
        await store.create_request("b", [1], PARAMS)
        failed = await store.fail("b", "verifier lost")
        assert (failed.status, failed.finish_reason) == ("failed", "verifier lost")
        assert 10 < await store.redis.ttl(key("b")) <= 60
        assert (await store.fail("a", "late")).status == "finished"  # a closed request stays as it is
        assert await store.fail("missing", "x") is None

    run(redis_url, prefix, body, finished_ttl_s=60, running_ttl_s=200)


def test_heartbeats_expire_and_filter_by_role(redis_url, prefix):
    async def body(store):
        await store.heartbeat("verifier", "v-0", {"load": 0.5, "queue_depth": 3, "gpu": None}, ttl_s=1)
        await store.heartbeat("drafter", "d-0", {"load": 0.1, "gpu": {"util": 40}}, ttl_s=30)
        beats = await store.heartbeats()
        assert [(b["role"], b["pod"]) for b in beats] == [("drafter", "d-0"), ("verifier", "v-0")]
        verifier = beats[1]
        assert verifier["queue_depth"] == 3 and verifier["gpu"] is None and 0 <= verifier["age_s"] < 1
        assert verifier["draining"] is False
        assert [b["pod"] for b in await store.heartbeats("verifier")] == ["v-0"]
        await asyncio.sleep(1.2)
        assert [b["pod"] for b in await store.heartbeats()] == ["d-0"]
        assert await store.heartbeats("verifier") == []

    run(redis_url, prefix, body)


def test_draining_flag_survives_heartbeats(redis_url, prefix):
    async def body(store):
        await store.heartbeat("drafter", "d-1", {"load": 0.2})
        await store.set_draining("drafter", "d-1", True)
        assert (await store.heartbeats("drafter"))[0]["draining"] is True
        echoed = await store.heartbeat("drafter", "d-1", {"load": 0.3})  # the pod learns it from its own heartbeat
        assert echoed["draining"] is True and (await store.heartbeats())[0]["draining"] is True
        await store.set_draining("drafter", "d-1", False)
        assert (await store.heartbeats())[0]["draining"] is False
        own = await store.heartbeat("drafter", "d-1", {"load": 0.3, "draining": True})  # a pod on SIGTERM
        assert own["draining"] is True and (await store.heartbeats())[0]["draining"] is True
        with pytest.raises(ValueError, match="pod"):
            await store.set_draining("drafter", "bad:pod", True)

    run(redis_url, prefix, body)


def test_scores_are_an_atomic_ema(redis_url, prefix):
    async def body(store):
        assert await store.update_score("python", "drafter-py", 0.8) == pytest.approx(0.8)
        assert await store.update_score("python", "drafter-py", 0.3) == pytest.approx(0.8 * 0.8 + 0.2 * 0.3)
        await store.update_score("python", "drafter-prose", 0.1, smoothing=1.0)
        await store.update_score("python|v2", "drafter-py", 0.9)  # a key containing '|' stays separate
        assert await store.scores("python") == pytest.approx({"drafter-py": 0.7, "drafter-prose": 0.1})
        assert await store.scores("python|v2") == pytest.approx({"drafter-py": 0.9})
        assert await store.scores("prose") == {}
        await asyncio.gather(*(store.update_score("k", "d", 1.0, smoothing=0.5) for _ in range(10)))
        await store.update_score("k", "d", 0.0, smoothing=0.5)
        assert (await store.scores("k"))["d"] == pytest.approx(0.5)  # 10 concurrent updates lost none
        with pytest.raises(ValueError, match="smoothing"):
            await store.update_score("k", "d", 1.0, smoothing=0.0)
        with pytest.raises(ValueError, match="drafter"):
            await store.update_score("k", "a|b", 1.0)

    run(redis_url, prefix, body)


def test_stream_work_moves_from_a_dead_consumer_to_a_live_one(redis_url, prefix):
    async def body(store):
        ids = [await store.enqueue("verify", f"job-{i}".encode()) for i in range(3)]
        dead = await store.consume("verify", "verifiers", "pod-dead", count=2)
        assert [payload for _, payload in dead] == [b"job-0", b"job-1"]  # consumed, never acked: the pod died
        live = await store.consume("verify", "verifiers", "pod-live", count=10)
        assert live == [(ids[2], b"job-2")]
        assert await store.ack("verify", "verifiers", [ids[2]]) == 1
        assert await store.reclaim("verify", "verifiers", "pod-live", min_idle_ms=60_000) == []  # not idle enough
        await asyncio.sleep(0.05)
        reclaimed = await store.reclaim("verify", "verifiers", "pod-live", min_idle_ms=20)
        assert reclaimed == dead
        stats = await store.queue_stats("verify", "verifiers")
        assert (stats["depth"], stats["pending"]) == (0, 2)
        assert await store.ack("verify", "verifiers", [entry_id for entry_id, _ in reclaimed]) == 2
        assert await store.reclaim("verify", "verifiers", "pod-live", min_idle_ms=0) == []
        assert await store.queue_stats("verify", "verifiers") == {"depth": 0, "pending": 0, "oldest_age_ms": 0}
        assert await store.reclaim("never-made", "verifiers", "pod-live", min_idle_ms=0) == []

    run(redis_url, prefix, body)


def test_commit_and_answer_is_one_atomic_idempotent_step(redis_url, prefix):
    """A stream job's round: committed, answered on the reply stream and acknowledged in one script when the commit
    applies; a retried round (a reclaimed job) is neither answered nor acknowledged there, and says what stands."""
    async def body(store):
        await store.create_request("r", [5], PARAMS)
        entry = await store.enqueue("verify", b"job")
        [(taken, _)] = await store.consume("verify", "verifiers", "v-0", count=1)
        assert taken == entry
        done = await store.commit_and_answer("r", 0, [10, 11], False, "", "verify", "verifiers", entry, "reply.a",
                                             b"answer-0")
        assert done.applied and done.outcome == "applied"
        with pytest.raises(LookupError, match="without reading the state back"):
            done.state  # noqa: B018
        assert [p for _, p in await store.take("reply.a")] == [b"answer-0"]
        assert await store.queue_stats("verify", "verifiers") == {"depth": 0, "pending": 0, "oldest_age_ms": 0}
        assert await store.redis.ttl(store.keys.stream("reply.a")) > 0 or \
            not await store.redis.exists(store.keys.stream("reply.a"))  # take() may have emptied it
        state = await store.get("r")
        assert state.output_ids == [10, 11] and state.round == 1 and state.round_offsets == [0]
        # the same round again (a reclaimed job verified twice): nothing applied, nothing answered, job kept
        again = await store.enqueue("verify", b"job-again")
        await store.consume("verify", "verifiers", "v-1", count=1)
        retry = await store.commit_and_answer("r", 0, [99], False, "", "verify", "verifiers", again, "reply.a", b"x")
        assert not retry.applied and retry.outcome == "retry" and retry.state.round_tokens(0) == [10, 11]
        assert await store.take("reply.a") == []
        assert (await store.queue_stats("verify", "verifiers"))["pending"] == 1
        last = await store.commit_and_answer("r", 1, [12], True, "length", "verify", "verifiers", again, "reply.a",
                                             b"answer-1")
        assert last.applied and [p for _, p in await store.take("reply.a")] == [b"answer-1"]
        assert (await store.get("r")).status == "finished"
        assert (await store.commit_and_answer("r", 2, [1], False, "", "verify", "verifiers", again, "reply.a",
                                              b"y")).outcome == "closed"
        with pytest.raises(RoundGapError):
            await store.commit_and_answer("r", 5, [1], False, "", "verify", "verifiers", again, "reply.a", b"y")
        with pytest.raises(RequestNotFoundError):
            await store.commit_and_answer("nope", 0, [1], False, "", "verify", "verifiers", again, "reply.a", b"y")
        assert await store.take("reply.a") == []

    run(redis_url, prefix, body)


def test_read_after_deletes_what_was_handled_in_the_same_round_trip(redis_url, prefix):
    async def body(store):
        ids = [await store.enqueue("reply.b", f"r{i}".encode()) for i in range(3)]
        first = await store.read_after("reply.b", "0-0", count=2)
        assert [p for _, p in first] == [b"r0", b"r1"]
        rest = await store.read_after("reply.b", first[-1][0], count=10, delete=[i for i, _ in first])
        assert rest == [(ids[2], b"r2")]
        assert await store.read_after("reply.b", "0-0") == rest  # the handled two are gone
        assert await store.read_after("reply.b", ids[2], block_ms=50, delete=[ids[2]]) == []
        assert await store.read_after("reply.b", "0-0") == []

    run(redis_url, prefix, body)


def test_queue_stats_and_bounded_blocking(redis_url, prefix):
    async def body(store):
        assert await store.queue_stats("draft", "drafters") == {"depth": 0, "pending": 0, "oldest_age_ms": 0}
        for i in range(5):
            await store.enqueue("draft", bytes([i]) * 3)
        assert (await store.queue_stats("draft", "drafters"))["depth"] == 5  # no group yet: all waiting
        await asyncio.sleep(0.02)
        taken = await store.consume("draft", "drafters", "d-0", count=2)
        stats = await store.queue_stats("draft", "drafters")
        assert (stats["depth"], stats["pending"]) == (3, 2) and stats["oldest_age_ms"] >= 15
        await store.ack("draft", "drafters", [entry_id for entry_id, _ in taken])
        rest = await store.consume("draft", "drafters", "d-0", count=10)
        assert [payload for _, payload in rest] == [bytes([i]) * 3 for i in range(2, 5)]
        started = time.monotonic()
        assert await store.consume("draft", "drafters", "d-0", count=1, block_ms=200) == []
        assert 0.15 < time.monotonic() - started < 2.0
        assert await store.consume("draft", "drafters", "d-0", count=1, block_ms=0) == []  # 0: never blocks
        assert (await store.queue_stats("draft", "drafters"))["pending"] == 3

    run(redis_url, prefix, body)


def test_store_checks_client_and_names(redis_url):
    async def body():
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        with pytest.raises(ValueError, match="decode_responses=False"):
            StateStore(client)
        await client.aclose()
        store = StateStore(connect(redis_url))
        assert await store.ping()
        await store.redis.aclose()
        unreachable = StateStore(connect(f"redis://127.0.0.1:{free_port()}/0", retry=None))
        assert not await unreachable.ping(timeout_s=1.0)
        await unreachable.redis.aclose()

    asyncio.run(body())
    for bad in ("", "a b", "x:", "*"):
        with pytest.raises(ValueError, match="prefix"):
            Keys(bad)
    with pytest.raises(ValueError, match="stream name"):
        Keys("sf").stream("a:b")


def test_connect_validates_urls():
    for bad, message in [
        ("http://localhost:6379", "scheme 'http'"),
        ("localhost:6379", "scheme"),
        ("redis://", "no host"),
        ("redis://host:99999", "bad port"),
        ("redis://host/abc", "database number"),
        ("", "empty"),
    ]:
        with pytest.raises(ValueError, match=message):
            connect(bad)
    with pytest.raises(ValueError) as excinfo:
        connect("http://:hunter2@host:6379")
    assert "hunter2" not in str(excinfo.value)
    with pytest.raises(ValueError, match="decode_responses"):
        connect("redis://localhost", decode_responses=True)

    async def make_tls_client():  # no I/O: only checks the URL maps to a TLS connection with the URL's password
        client = connect("rediss://:p%40ss@cache.example:6380/2", ssl_cert_reqs="required")
        kwargs = client.connection_pool.connection_kwargs
        await client.aclose()
        return client.connection_pool.connection_class.__name__, kwargs

    connection_class, kwargs = asyncio.run(make_tls_client())
    assert connection_class == "SSLConnection"
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == ("cache.example", 6380, 2, "p@ss")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_embedded_redis_starts_answers_and_stops():
    with pytest.raises(ValueError, match="loopback"):
        start_embedded_redis(host="0.0.0.0")
    server = start_embedded_redis(password="s3cret:/@")
    try:
        assert server.running and server.host == "127.0.0.1" and server.url.startswith("redis://:")
        client = redis.Redis(host="127.0.0.1", port=server.port, password="s3cret:/@")
        assert client.ping()
        assert client.config_get("bind")["bind"] == "127.0.0.1" and client.config_get("save")["save"] == ""
        client.close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, retry=None).ping()

        async def through_connect():
            store = StateStore(connect(server.url), prefix="embedded")
            await store.create_request("x", [1, 2], PARAMS)
            result = await store.commit_round("x", 0, [3], finished=True)
            await store.redis.aclose()
            return result

        assert asyncio.run(through_connect()).state.output_ids == [3]
    finally:
        server.stop()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    server.stop()  # idempotent

    port = free_port()
    with start_embedded_redis(port=port) as fixed:
        assert fixed.port == port and redis.Redis(port=port).ping()
    assert not fixed.running


def test_a_cancelled_blocking_read_is_cancelled_never_retried_and_returned(redis_url, prefix):
    """redis-py can swallow a cancel of a blocking read (it retries the command on a new connection and returns its
    reply); a service loop around it then never ends and the server's stop hangs. connect()'s client raises
    CancelledError instead, for single commands and pipelines, whenever the cancel lands."""

    async def body(store):
        outcomes = []
        key = store.keys.stream("cancel-test")
        for i in range(30):
            async def read(pipelined):
                if pipelined:
                    async with store.redis.pipeline(transaction=False) as pipe:
                        pipe.xdel(key, "1-0")
                        pipe.xread({key: "$"}, block=300)
                        await pipe.execute()
                else:
                    await store.redis.xread({key: "$"}, block=300)
                return "returned"

            task = asyncio.create_task(read(pipelined=i % 2 == 1))
            await asyncio.sleep(0.001 + 0.005 * (i % 5))  # cancels land at every stage of the call
            task.cancel()
            try:
                outcomes.append(await task)
            except asyncio.CancelledError:
                outcomes.append("cancelled")
        return outcomes

    assert run(redis_url, prefix, body) == ["cancelled"] * 30
