"""Rolling updates of routers without cut streams, in process (four router replicas on one fleet: a suffix drafter,
two verifiers so DSI speculative rounds run too; real gRPC on loopback, the real Redis under a fresh prefix).

A router told to stop (its server's graceful stop, as SIGTERM does) with another replica alive hands each live
stream over: the stream ends after its next round with UNAVAILABLE naming the request id, and the SDK, given the
replicas, resumes it on another one from Redis. Generations run far longer than the grace; every output equals the
target's own (greedy: Hugging Face `generate`; seeded sampling: plain decoding under the same seed), each token
reaches the caller once, and the draining router does no more work for the requests it handed over. An
OpenAI-compatible SSE stream cannot be resumed: it runs on until shortly before the grace ends, then ends with an
error event that says so."""

import json
import threading
import time
import uuid

import grpc
import httpx
import pytest

from specfleet.api.v1 import router_pb2, router_pb2_grpc
from specfleet.bench.reliability import purge
from specfleet.engine.sampling import SamplingParams
from specfleet.local.inprocess import LocalFleet
from specfleet.router.limits import HANDED_OVER
from specfleet.runtime.process import ServeOptions
from specfleet.sdk import Client

from .references import target_greedy

REDIS_URL = "redis://127.0.0.1:6379/0"
NEW_TOKENS = 160
GRACE_S = 1.0  # each stream runs for far longer than this after the drain
PROMPTS = ("def add(a, b):\n    return a + b\n\n\ndef", "The server stores the request. The server",
           "for i in range(10):\n    print(i)\nfor i in")
SAMPLED = SamplingParams(0.8, 0.95, 0, 11)


@pytest.fixture(scope="module")
def fleet(models_dir):
    prefix = f"sftest-rolling-{uuid.uuid4().hex[:8]}"
    opts = ServeOptions(models_dir, redis_url=REDIS_URL, key_prefix=prefix, slots=8, heartbeat_s=0.5)
    with LocalFleet(opts, pools=("suffix",), verifiers=2, fusion=False, routers=4) as running:
        running.prefix = prefix
        routers = [running.services[n] for n in ("router", "router-1", "router-2", "router-3")]
        deadline = time.monotonic() + 30
        while any(len(r.peers()) < 3 for r in routers):  # each replica sees the others in heartbeats
            assert time.monotonic() < deadline, [r.peers() for r in routers]
            time.sleep(0.2)
        yield running
    purge(REDIS_URL, prefix)


@pytest.fixture(scope="module")
def references(load_model, tokenizer, models_dir):
    from specfleet.engine.engine import Request
    from specfleet.engine.factory import build_engine

    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    target = load_model("target")
    greedy = target_greedy(target, ids, NEW_TOKENS, tokenizer.pad_token_id)
    engine = build_engine(models_dir, "none", (), batch_size=2, k=1, adaptive=False, target=target)
    sampled = [r.token_ids for r in engine.generate([Request(f"s{i}", p, NEW_TOKENS, SAMPLED)
                                                     for i, p in enumerate(ids[:1])])]
    return ids, greedy, sampled


def test_a_draining_router_hands_its_streams_over_and_nothing_is_lost_or_repeated(fleet, references):
    ids, greedy, sampled = references
    cases = [(ids[0], greedy[0], {}), (ids[1], greedy[1], {}),
             (ids[0], sampled[0], dict(temperature=SAMPLED.temperature, top_p=SAMPLED.top_p, seed=SAMPLED.seed))]
    assert all(len(want) > 60 for _, want, _ in cases)  # long enough to be mid-stream at the drain
    draining = fleet.services["router"]
    results: list[dict] = [{} for _ in cases]

    def stream(i: int) -> None:
        prompt, _, sampling = cases[i]
        got = results[i]
        got.update(tokens=[], offsets=[], text="", error="")
        # the SDK given every replica, the draining one first: a failed attempt moves on to the next
        with Client(fleet.router_addresses, timeout=300, retries=8, backoff=0.1) as client:
            try:
                for chunk in client.generate(prompt_token_ids=prompt, max_new_tokens=NEW_TOKENS, **sampling):
                    if chunk.token_ids:
                        got["offsets"].append(chunk.offset)
                    got["tokens"] += chunk.token_ids
                    got["text"] += chunk.text
                    if chunk.finished:
                        got["ended"] = time.monotonic()
            except Exception as exc:  # noqa: BLE001  (recorded; asserted below)
                got["error"] = repr(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while not all(len(r.get("tokens", ())) >= 8 for r in results):  # every stream is live on the first router
        assert time.monotonic() < deadline and all(t.is_alive() for t in threads), results
        time.sleep(0.05)
    live = draining.live
    assert live == len(cases)
    drained_at = time.monotonic()
    fleet.stop_role("router", grace=GRACE_S)  # what SIGTERM does: readiness off, handover, stop within the grace
    stopped = time.monotonic() - drained_at
    rounds_after_stop = draining.rounds
    for t in threads:
        t.join(300)
    for (_, want, _), got in zip(cases, results, strict=True):
        assert got["error"] == ""
        assert got["tokens"] == want  # the target's own output: no token lost, none repeated
        assert got["offsets"] == sorted(set(got["offsets"]))  # each token reached the caller once
    assert stopped <= GRACE_S + 2
    assert draining.handed_over == live  # every stream was handed over, none cut by the server's stop
    print(f"handed over {draining.handed_over}, of them inside a round at the deadline {draining.handover_cuts}; "
          f"stop took {stopped:.2f} s")
    assert draining.live == 0 and not draining.streams
    assert draining.rounds == rounds_after_stop  # the draining router did no more work for them
    resumed_on = sum(fleet.services[n].rounds for n in ("router-1", "router-2"))
    assert resumed_on > 0
    assert max(r["ended"] for r in results) - drained_at > 3 * GRACE_S  # the generations outlasted the grace
    # Redis: each request finished once, its committed rounds those the routers sent (no round committed twice)
    assert sorted(fleet.services["router-1"].peers()) == sorted(fleet.router_addresses[2:])


def test_an_sse_stream_cannot_be_resumed_and_ends_with_an_error_event_at_the_grace(fleet, references):
    """The OpenAI-compatible stream has no request id to resume by: the draining router lets it run on (it could
    finish within the grace), then, shortly before the grace ends, ends it with an error event naming the drain."""
    from specfleet.router.http import build_app, start_http_in_thread

    ids, greedy, _ = references
    server, thread, port = start_http_in_thread(build_app(fleet.router_addresses[1]))
    draining = fleet.services["router-1"]
    events: list[str] = []
    try:
        body = {"prompt": ids[2], "max_tokens": 600, "stream": True, "temperature": 0, "ignore_eos": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as reply:
            assert reply.status_code == 200
            stopper = None
            for line in reply.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if stopper is None and len(events) >= 2:
                    stopper = threading.Thread(target=fleet.stop_role, args=("router-1",),
                                               kwargs={"grace": 2 * GRACE_S})
                    handed_before = draining.handed_over
                    stopper.start()
            stopper.join(30)
    finally:
        server.should_exit = True
        thread.join(10)
    assert events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["message"].startswith(HANDED_OVER) and "cannot be resumed" in error["message"]
    assert error["code"] == "unavailable"
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert len(texts) > 2  # it ran on after the drain began, not ended at its next round
    assert draining.handed_over == handed_before + 1 and draining.live == 0


def test_a_router_marked_draining_hands_its_streams_over_and_serves_again_when_unmarked(fleet, references):
    """The operator's drain mark (in Redis, read with the heartbeat) starts the same handover, without a deadline:
    the stream resumes on the other replica, new calls to the marked router are refused, and once the mark is
    cleared it takes requests again."""
    ids, greedy, _ = references
    marked = fleet.services["router-3"]
    publisher = fleet.servers[list(fleet.services).index("router-3")].publisher
    targets = [fleet.router_addresses[3], fleet.router_addresses[2]]
    got: dict = {"tokens": []}

    def stream() -> None:
        with Client(targets, timeout=300, retries=8, backoff=0.1) as client:
            completion = None
            for chunk in client.generate(prompt_token_ids=ids[1], max_new_tokens=NEW_TOKENS, seed=0):
                got["tokens"] += chunk.token_ids
                completion = chunk
            got["finished"] = completion.finished

    thread = threading.Thread(target=stream)
    thread.start()
    deadline = time.monotonic() + 120
    while len(got["tokens"]) < 8:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    fleet.run(marked.store.set_draining("router", publisher.pod, True))
    # read the mark now rather than at the next heartbeat (0.5 s): on a quiet machine the stream's last 150 tokens
    # can be done before then, and there is nothing left to hand over
    fleet.run(publisher.beat(publisher.snapshot(), 0.5))
    thread.join(300)
    try:
        assert got["tokens"] == greedy[1] and got["finished"]
        assert marked.handed_over == 1 and marked.handover_cuts == 0
        with grpc.insecure_channel(fleet.router_addresses[3]) as channel, pytest.raises(grpc.RpcError) as refused:
            router_pb2_grpc.RouterStub(channel).Complete(
                router_pb2.GenerateRequest(prompt_token_ids=ids[1], max_new_tokens=2), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details()
    finally:
        fleet.run(marked.store.set_draining("router", publisher.pod, False))
    deadline = time.monotonic() + 30
    while marked.handing_over:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with grpc.insecure_channel(fleet.router_addresses[3]) as channel:
        reply = router_pb2_grpc.RouterStub(channel).Complete(
            router_pb2.GenerateRequest(prompt_token_ids=ids[1], max_new_tokens=4), timeout=60)
    assert list(reply.token_ids) == greedy[1][:4]
    deadline = time.monotonic() + 30
    while fleet.router_addresses[3] not in fleet.services["router-2"].peers():  # a peer again for the next test
        assert time.monotonic() < deadline
        time.sleep(0.1)

def test_a_round_still_waiting_at_the_deadline_is_withdrawn_and_the_stream_told_where_to_resume(fleet, references):
    """The verifiers stop taking rounds, so the stream waits inside a round when the router drains: shortly before
    the grace ends the router withdraws the round and ends the stream with UNAVAILABLE naming the request id and the
    tokens delivered; resumed on another replica by that id, the output is the target's, each token once."""
    ids, greedy, _ = references
    draining = fleet.services["router-2"]
    consumers = [fleet.servers[list(fleet.services).index(f"verifier-{i}")].consumer for i in range(2)]
    rid = f"rolling-{uuid.uuid4().hex}"
    got, error = [], None
    with grpc.insecure_channel(fleet.router_addresses[2]) as channel:
        call = router_pb2_grpc.RouterStub(channel).Generate(
            router_pb2.GenerateRequest(request_id=rid, prompt_token_ids=ids[1], max_new_tokens=NEW_TOKENS),
            timeout=120)
        try:
            for message in call:
                got += message.token_ids
                if len(got) >= 8 and consumers[0]._taking.is_set():
                    for consumer in consumers:
                        fleet.run(_pause(consumer, True))
                    # the rounds in hand finish; then the stream waits in a round no verifier takes
                    threading.Timer(2.0, fleet.stop_role, args=("router-2",), kwargs={"grace": GRACE_S}).start()
        except grpc.RpcError as exc:
            error = exc
        finally:
            for consumer in consumers:
                fleet.run(_pause(consumer, False))
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert error.details().startswith(HANDED_OVER)
    assert f"after {len(got)} tokens" in error.details() and rid in error.details()
    assert draining.handed_over == draining.handover_cuts == 1 and draining.live == 0
    assert 0 < len(got) < len(greedy[1]) and got == greedy[1][:len(got)]
    with Client(fleet.router_addresses[3], timeout=300, retries=4, backoff=0.1) as client:
        resumed = client.complete(prompt_token_ids=ids[1], max_new_tokens=NEW_TOKENS, request_id=rid, seed=0)
    assert resumed.token_ids == greedy[1]  # the withdrawn round was verified once more on the other replica


async def _pause(consumer, paused: bool) -> None:
    consumer.pause(paused)
