"""Faults injected into live streams of the fleet running as real processes (one `specfleet serve ROLE` each, gRPC
on loopback, the real Redis): kill -9 of a drafter, the fusion service, a verifier and the router, SIGSTOP of a
verifier, SIGTERM of the router. Every stream completes through the SDK (which resumes by request id) with output
identical to the target's own greedy decoding: no token missing, none repeated. Under load (several streams at once,
greedy and seeded sampled), a fault mid-run loses no request, changes no output and holds every request to its
deadline + 5 s."""

import asyncio
import signal
import time

import grpc
import pytest
import torch

from specfleet.api.v1 import router_pb2, router_pb2_grpc
from specfleet.bench.prompts import build_prompts
from specfleet.bench.reliability import ProcessFleet, run_fault, stream_with_fault
from specfleet.bench.under_load import faults_under_load
from specfleet.router.serve import start_router
from specfleet.runtime.process import ServeOptions
from specfleet.state.embedded import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"
TOKEN = "fault-test-token"
NEW_TOKENS = 48  # the fault lands after the first chunk: dozens of tokens still follow it (resumed or not)
FAULTS = ("kill -9 drafter-python", "kill -9 fusion", "kill -9 verifier-0", "SIGSTOP verifier-1", "kill -9 router")
UNDER_LOAD_FAULTS = ("kill -9 drafter-python", "SIGSTOP verifier-1")


@pytest.fixture(scope="module")
def fleet(models_dir):
    # adaptive control off: every round drafts with both pools, so the fusion service is on every round's path
    with ProcessFleet(models_dir, REDIS_URL, pools=("python", "prose"), verifiers=2, token=TOKEN,
                      router_flags=("--rpc-timeout", "3", "--no-adaptive")) as running:
        yield running


@pytest.fixture(scope="module")
def cases(load_model, tokenizer):
    """(prompt ids, the target's greedy continuation) for prompts whose continuation runs the full length, so a
    fault injected after the first chunk always lands mid-stream."""
    target = load_model("target")
    found = []
    for item in build_prompts():
        ids = tokenizer(item["prompt"], add_special_tokens=False).input_ids[-48:]
        with torch.no_grad():
            want = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                   pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        if len(want) == NEW_TOKENS:
            found.append((ids, want))
        if len(found) == len(FAULTS) + 2:
            return found
    pytest.fail("too few held-out prompts run the full length without an end-of-text token")


def test_unfaulted_stream_equals_target_greedy(fleet, cases, tokenizer):
    ids, want = cases[-1]
    run = stream_with_fault(fleet.router_address, ids, NEW_TOKENS, token=TOKEN)
    assert run.error == "" and run.tokens == want and run.text == tokenizer.decode(want)


@pytest.mark.parametrize("index,fault", list(enumerate(FAULTS)), ids=[f.replace(" ", "_") for f in FAULTS])
def test_fault_mid_stream_leaves_the_output_identical(fleet, cases, tokenizer, index, fault):
    ids, want = cases[index]
    run = run_fault(fleet, fault, ids, NEW_TOKENS)
    assert run.error == ""
    assert 0 < run.injected_at < NEW_TOKENS  # the fault hit a live stream
    assert run.tokens == want  # identical to the target's greedy decoding: nothing lost, nothing repeated
    assert run.text == tokenizer.decode(want)
    assert run.offsets[0] == 0 and run.exactly_once
    assert fleet.crashed() == []  # the faulted service was restarted (or continued) and the rest never fell over


def test_faults_under_load_lose_nothing_and_change_nothing(fleet, tokenizer):
    """`bench reliability --under-load` in small: 6 streams at once (3 greedy, 3 sampled with seeds), a fault-free
    run, then each fault injected once the streams hold half their tokens and repaired 5 s later. Every request
    completes with the fault-free run's output and ends within its deadline + 5 s (a generous deadline: this checks
    that nothing hangs, not speed)."""
    prompts = [tokenizer(item["prompt"], add_special_tokens=False).input_ids[-32:] for item in build_prompts()[:3]]
    section = faults_under_load(fleet, prompts, streams=6, new_tokens=12, deadline_s=120.0, outage_s=5.0,
                                faults=UNDER_LOAD_FAULTS)
    assert (section["greedy"], section["sampled"]) == (3, 3)
    assert section["fault_free"]["completed"] == 6 and section["fault_free"]["late"] == 0
    assert [r["fault"] for r in section["runs"]] == list(UNDER_LOAD_FAULTS)
    for run in section["runs"]:
        assert run["injected"] and run["live_at_injection"] > 0, run  # the fault hit live streams
        assert run["completed"] == 6 and run["lost"] == 0, run
        assert run["differing"] == 0 and run["uncompared"] == 0, run  # identical to the fault-free run
        assert run["within_deadline"] == 6 and run["late"] == 0, run
        assert run["crashed"] == [], run
    assert section["survived"] == len(UNDER_LOAD_FAULTS)
    assert section["requests_lost"] == section["outputs_differing_from_fault_free"] == section["requests_late"] == 0


def test_sigterm_lets_the_in_flight_stream_finish(fleet, cases):
    """Graceful shutdown: the router's readiness flips, the stream in flight completes on the same call (no retry),
    and the process exits by itself within the grace period."""
    ids, want = cases[-2]
    router = fleet.services["router"]
    got, signalled = [], False
    try:
        with grpc.insecure_channel(fleet.router_address) as channel:
            stream = router_pb2_grpc.RouterStub(channel).Generate(
                router_pb2.GenerateRequest(prompt_token_ids=ids, max_new_tokens=NEW_TOKENS), timeout=60,
                metadata=(("authorization", f"Bearer {TOKEN}"),))
            for message in stream:
                got += message.token_ids
                if not signalled and not message.finished and router.alive():
                    fleet.signal("router", signal.SIGTERM)
                    signalled = True
        assert got == want
        start = time.monotonic()
        router.proc.wait(20)  # grace is 5 s
        assert router.proc.returncode == 0 and time.monotonic() - start < 20
    finally:
        fleet.restart("router")


def test_redis_unreachable_is_unavailable_with_a_clear_message(models_dir):
    """With its Redis gone the router answers UNAVAILABLE (which the SDK retries), saying why, instead of UNKNOWN."""
    from specfleet.router.service import FleetConfig

    async def scenario():
        opts = ServeOptions(models_dir, redis_url=f"redis://127.0.0.1:{free_port()}/0", heartbeat_s=0)
        running, router = await start_router(opts, FleetConfig(drafters={}, verifiers=["127.0.0.1:1"], discover_s=0))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await router_pb2_grpc.RouterStub(channel).Complete(
                        router_pb2.GenerateRequest(prompt_token_ids=[5, 6], max_new_tokens=2), timeout=30)
            return err.value
        finally:
            await running.stop(0)
            await router.close()

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "state store (Redis) is unreachable" in error.details() and "same request_id" in error.details()
