"""The fleet over real gRPC on loopback with the real Redis: output identical to the target's own greedy decoding,
streaming order, concurrency, resume by request id, a drafter restart, bad input, health and reflection."""

import asyncio
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specfleet.api.v1 import router_pb2, router_pb2_grpc
from specfleet.bench.fleet_bench import delete_prefix
from specfleet.bench.prompts import build_prompts
from specfleet.local.inprocess import LocalFleet
from specfleet.runtime.process import ServeOptions

from .references import target_greedy

NEW_TOKENS = 16
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def fleet(models_dir):
    prefix = f"sftest-{uuid.uuid4().hex[:8]}"
    with LocalFleet(ServeOptions(models_dir, redis_url=REDIS_URL, key_prefix=prefix, slots=40),
                    pools=("python", "prose", "c", "suffix"), adaptive=False) as running:  # always draft + fuse
        yield running
    delete_prefix(REDIS_URL, prefix)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    items = build_prompts()
    picked = items[::2][:24]  # all three domains
    return [tokenizer(p["prompt"], add_special_tokens=False).input_ids[-40:] for p in picked]


@pytest.fixture(scope="module")
def references(load_model, prompts, tokenizer):
    return target_greedy(load_model("target"), prompts, NEW_TOKENS, tokenizer.pad_token_id)


async def _generate(address, **fields):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        return [m async for m in stub.Generate(router_pb2.GenerateRequest(**fields), timeout=120)]


def _tokens(messages):
    return [t for m in messages for t in m.token_ids]


def test_fleet_output_equals_target_greedy_and_streams_in_order(fleet, prompts, references, tokenizer):
    assert len(prompts) >= 20

    async def run_all():
        return await asyncio.gather(*(_generate(fleet.router_address, prompt_token_ids=p,
                                                max_new_tokens=NEW_TOKENS) for p in prompts))

    results = asyncio.run(run_all())
    drafted = 0
    for messages, want in zip(results, references, strict=True):
        assert _tokens(messages) == want
        offsets = [m.offset for m in messages]
        assert offsets == [sum(len(m.token_ids) for m in messages[:i]) for i in range(len(messages))]
        assert [m.finished for m in messages] == [False] * (len(messages) - 1) + [True]
        assert "".join(m.text for m in messages) == tokenizer.decode(want)
        usage = messages[-1].usage
        assert usage.completion_tokens == len(want) and usage.rounds == len(messages)
        drafted += usage.accepted_tokens
    assert drafted > 0  # speculation happened through the drafter / fusion services


def test_32_concurrent_streams(fleet, prompts, references):
    async def run_all():
        return await asyncio.gather(*(_generate(fleet.router_address, prompt_token_ids=prompts[i % len(prompts)],
                                                max_new_tokens=NEW_TOKENS) for i in range(32)))

    for i, messages in enumerate(asyncio.run(run_all())):
        assert _tokens(messages) == references[i % len(prompts)]


def test_a_request_id_resumes_instead_of_starting_over(fleet, prompts, references):
    rid = f"resume-{uuid.uuid4().hex}"
    first = asyncio.run(_generate(fleet.router_address, request_id=rid, prompt_token_ids=prompts[0],
                                  max_new_tokens=NEW_TOKENS))
    again = asyncio.run(_generate(fleet.router_address, request_id=rid, prompt_token_ids=prompts[0],
                                  max_new_tokens=NEW_TOKENS))
    assert _tokens(first) == _tokens(again) == references[0]
    assert again[0].offset == 0 and again[-1].finished  # replayed from Redis, nothing generated twice
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_generate(fleet.router_address, request_id=rid, prompt_token_ids=prompts[1],
                              max_new_tokens=NEW_TOKENS))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request id" in err.value.details()


def test_a_drafter_restart_between_requests_changes_nothing(fleet, prompts, references):
    port = fleet.stop_role("drafter-python")
    # while it is down: requests still complete, identical (drafting degrades, output never changes)
    down = asyncio.run(_generate(fleet.router_address, prompt_token_ids=prompts[1], max_new_tokens=NEW_TOKENS,
                                 drafters=["python"]))
    assert _tokens(down) == references[1]
    fleet.restart_drafter("python")
    service = fleet.services["drafter-python"]
    assert fleet.servers[list(fleet.services).index("drafter-python")].port == port
    deadline = time.monotonic() + 30  # the router's channel reconnects within its (short) backoff
    while service.drafted == 0 and time.monotonic() < deadline:
        after = asyncio.run(_generate(fleet.router_address, prompt_token_ids=prompts[2],
                                      max_new_tokens=NEW_TOKENS, drafters=["python"]))
        assert _tokens(after) == references[2]
        time.sleep(0.2)
    assert service.drafted > 0  # the new replica drafted for it, rebuilding its cache from the context


@pytest.mark.parametrize("fields,message", [
    (dict(prompt="", max_new_tokens=4), "prompt is empty"),
    (dict(prompt="x", max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(prompt="x", max_new_tokens=5000), "exceeds the model's context"),
    (dict(prompt_token_ids=[10**6], max_new_tokens=4), "prompt_token_ids must be in"),
    (dict(prompt="x", prompt_token_ids=[5], max_new_tokens=4), "not both"),
    (dict(prompt="x", max_new_tokens=4, temperature=float("nan")), "temperature"),
    (dict(prompt="x", max_new_tokens=4, top_p=1.5), "top_p"),
    (dict(prompt="x", max_new_tokens=4, drafters=["nope"]), "unknown drafter pool"),
])
def test_bad_requests_get_invalid_argument_with_what_to_fix(fleet, fields, message):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_generate(fleet.router_address, **fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_every_server_answers_health_and_reflection(fleet):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def check(port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            async for answer in stub.ServerReflectionInfo(iter([request]), timeout=5):
                return {s.name for s in answer.list_services_response.service}

    for running in fleet.servers:
        names = asyncio.run(check(running.port))
        assert "grpc.health.v1.Health" in names and any(n.startswith("specfleet.api.v1.") for n in names)
