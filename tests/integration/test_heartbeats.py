"""Pod heartbeats over the real Redis: every service publishes its load (no GPU here: gpu is null); the router finds
replicas in heartbeats; a verifier marked draining answers NOT_SERVING, gets no new rounds, and output stays exact."""

import asyncio
import time
import uuid

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specfleet.api.v1 import router_pb2, router_pb2_grpc
from specfleet.bench.fleet_bench import delete_prefix
from specfleet.local.inprocess import LocalFleet
from specfleet.runtime.process import ServeOptions
from specfleet.state import StateStore, connect
from specfleet.state.heartbeat import advertised_address, gpu_readings, rates

REDIS_URL = "redis://127.0.0.1:6379/0"
NEW_TOKENS = 12


def test_rates_from_counter_snapshots():
    before = {"busy_s": 1.0, "tokens": 100, "steps": 10, "wait_s": 0.5, "waited": 10, "rounds": 4}
    after = {"busy_s": 1.5, "tokens": 300, "steps": 20, "wait_s": 0.6, "waited": 30, "rounds": 8}
    got = rates(before, after, 2.0)
    assert got["busy_frac"] == pytest.approx(0.25)
    assert got["tokens_per_s"] == pytest.approx(100)
    assert got["rounds_per_s"] == pytest.approx(2)
    assert got["step_ms"] == pytest.approx(50)
    assert got["queue_wait_ms"] == pytest.approx(5)
    assert rates(after, after, 1.0)["step_ms"] == 0.0  # idle: no division by zero


def test_no_gpu_reads_as_none_and_addresses():
    assert gpu_readings() is None  # these machines have no GPU; the pod carries on
    assert advertised_address("0.0.0.0", 5) == "127.0.0.1:5"
    assert advertised_address("127.0.0.2", 5) == "127.0.0.2:5"


@pytest.fixture(scope="module")
def fleet(models_dir):
    prefix = f"sftest-hb-{uuid.uuid4().hex[:8]}"
    opts = ServeOptions(models_dir, redis_url=REDIS_URL, key_prefix=prefix, slots=8, heartbeat_s=0.2)
    with LocalFleet(opts, pools=("suffix",), verifiers=2) as running:
        yield running, prefix
    delete_prefix(REDIS_URL, prefix)


async def _beats(prefix, role=None):
    store = StateStore(connect(REDIS_URL), prefix=prefix)
    try:
        return await store.heartbeats(role)
    finally:
        await store.redis.aclose()


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def _generate(address, prompt_ids, rid):
    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            reply = await stub.Complete(router_pb2.GenerateRequest(request_id=rid, prompt_token_ids=prompt_ids,
                                                                   max_new_tokens=NEW_TOKENS), timeout=60)
            return list(reply.token_ids)

    return asyncio.run(run())


def _health(address):
    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return reply.status

    return asyncio.run(run())


def test_every_role_publishes_load(fleet):
    running, prefix = fleet
    beats = _wait_for(lambda: (b := asyncio.run(_beats(prefix))) and {x["role"] for x in b} >= {
        "router", "drafter", "verifier"} and b)
    by_role = {}
    for beat in beats:
        by_role.setdefault(beat["role"], []).append(beat)
    assert len(by_role["verifier"]) == 2
    for beat in beats:
        assert beat["gpu"] is None
        assert beat["address"].startswith("127.0.0.1:")
        for key in ("busy_frac", "tokens_per_s", "step_ms", "queue_depth", "inflight", "queue_wait_ms"):
            assert key in beat, (beat["role"], key)
    assert by_role["drafter"][0]["pool"] == "suffix"
    assert "acceptance" in by_role["router"][0] and "live" in by_role["router"][0]


def test_draining_verifier_gets_no_new_rounds_and_output_stays_exact(fleet, load_model, tokenizer):
    running, prefix = fleet
    target = load_model("target")
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in
               ("def parse(argv):\n", "The server stores", "#include <stdio.h>\nint main", "import os\n")]
    with torch.no_grad():
        refs = [target.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist() for p in prompts]
    beats = _wait_for(lambda: len(b := asyncio.run(_beats(prefix, "verifier"))) == 2 and b)
    drained = beats[0]

    async def drain():
        store = StateStore(connect(REDIS_URL), prefix=prefix)
        await store.set_draining("verifier", drained["pod"], True)
        await store.redis.aclose()

    asyncio.run(drain())
    _wait_for(lambda: _health(drained["address"]) == health_pb2.HealthCheckResponse.NOT_SERVING)
    router = running.services["router"]
    _wait_for(lambda: drained["address"] in router.draining)
    port = int(drained["address"].rsplit(":", 1)[1])
    service = next(s for name, s in running.services.items()
                   if name.startswith("verifier") and running.servers[list(running.services).index(name)].port == port)
    before = service.rounds
    outs = [_generate(running.router_address, p, f"drain-{i}-{uuid.uuid4().hex[:6]}") for i, p in enumerate(prompts)]
    assert outs == refs
    assert service.rounds == before  # every round went to the other verifier
