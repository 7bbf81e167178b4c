"""Hostile and broken input against a real fleet (gRPC on loopback, the real Redis) and its OpenAI-compatible HTTP
front: every bad field, random requests (hypothesis), malformed protobuf bytes, wrong JSON, oversized messages.
Each gets INVALID_ARGUMENT / HTTP 400 (404 for an unknown model, 413 for an oversized body) with a message that
says what to fix, never a crash; the fleet still answers a valid request afterwards. Admission control: beyond
`max_concurrent` live requests the router answers RESOURCE_EXHAUSTED at once (HTTP 429)."""

import asyncio
import json
import math
import uuid

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specfleet.api.v1 import router_pb2, router_pb2_grpc
from specfleet.bench.fuzz import fuzz
from specfleet.bench.reliability import BAD_BODIES, BAD_BYTES, BAD_FIELDS, purge
from specfleet.local.inprocess import LocalFleet
from specfleet.router.http import build_app, start_http_in_thread
from specfleet.runtime.process import ServeOptions

REDIS_URL = "redis://127.0.0.1:6379/0"
TOKEN = "bad-input-token"
METADATA = (("authorization", f"Bearer {TOKEN}"),)
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
VOCAB, CONTEXT = 8192, 1024  # the bundled target's (checked in the fixture)
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
INT32 = st.integers(-(2**31), 2**31 - 1)


@pytest.fixture(scope="module")
def fleet(models_dir):
    prefix = f"sftest-bad-{uuid.uuid4().hex[:8]}"
    with LocalFleet(ServeOptions(models_dir, redis_url=REDIS_URL, key_prefix=prefix, slots=8, token=TOKEN),
                    pools=("suffix",), fusion=False) as running:
        router = running.services["router"]
        assert (router.vocab_size, router.max_positions) == (VOCAB, CONTEXT)
        yield running
    purge(REDIS_URL, prefix)


@pytest.fixture(scope="module")
def channel(fleet):
    with grpc.insecure_channel(fleet.router_address) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return router_pb2_grpc.RouterStub(channel)


@pytest.fixture(scope="module")
def http(fleet):
    server, thread, port = start_http_in_thread(build_app(fleet.router_address, TOKEN), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def complete(stub, **fields):
    """(code, details, response) of one Complete call."""
    try:
        return grpc.StatusCode.OK, "", stub.Complete(router_pb2.GenerateRequest(**fields), timeout=60,
                                                       metadata=METADATA)
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), None


def assert_still_serving(stub):
    code, details, reply = complete(stub, prompt_token_ids=[5, 6, 7], max_new_tokens=3)
    assert code == grpc.StatusCode.OK, details
    assert 1 <= len(reply.token_ids) <= 3


# ---------------------------------------------------------------- gRPC

@pytest.mark.parametrize("name,value,fragment", BAD_FIELDS, ids=[f"{n}={str(v)[:20]}" for n, v, _ in BAD_FIELDS])
def test_each_bad_field_is_invalid_argument_saying_what_to_fix(stub, name, value, fragment):
    fields = {"prompt_token_ids": [5, 6, 7], "max_new_tokens": 2, name: value}
    if name == "prompt":
        fields.pop("prompt_token_ids")
    code, details, _ = complete(stub, **fields)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in details


def test_prompt_text_beyond_the_context_and_both_prompt_kinds(stub):
    code, details, _ = complete(stub, prompt="word " * 3000, max_new_tokens=2)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the model's context" in details
    code, details, _ = complete(stub, prompt="x", prompt_token_ids=[5], max_new_tokens=2)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not both" in details


def problems(tokenizer, f: dict) -> list[str]:
    """An independent oracle: the fragments a correct router may name for these fields (empty: the request is
    valid)."""
    found = []
    ids = tokenizer(f["prompt"], add_special_tokens=False).input_ids if f["prompt"] else f["prompt_token_ids"]
    if f["prompt"] and f["prompt_token_ids"]:
        found.append("not both")
    if not ids:
        found.append("the prompt is empty")
    elif min(ids) < 0 or max(ids) >= VOCAB:
        found.append("prompt_token_ids must be in")
    if f["max_new_tokens"] < 1:
        found.append("max_new_tokens must be >= 1")
    elif len(ids) + f["max_new_tokens"] > CONTEXT:
        found.append("exceeds the model's context")
    t, p = f["temperature"], f["top_p"]
    if math.isnan(t) or math.isinf(t) or t < 0 or 0 < t < 1e-4:
        found.append("temperature must be")
    if math.isnan(p) or p < 0 or p > 1:
        found.append("top_p must be")
    if f["top_k"] < 0:
        found.append("top_k must be")
    if any(d != "suffix" for d in f["drafters"]):
        found.append("unknown drafter pool")
    return found


FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
REQUESTS = st.fixed_dictionaries({
    "prompt": st.one_of(st.just(""), st.text(max_size=40)),
    "prompt_token_ids": st.lists(st.one_of(st.integers(0, VOCAB - 1), INT32), max_size=6),
    # valid requests generate: keep them to a few tokens; the rest is out of range on either side
    "max_new_tokens": st.one_of(st.integers(1, 3), INT32),
    "temperature": st.one_of(st.just(0.0), FLOAT32),
    "top_p": st.one_of(st.just(0.0), st.just(1.0), FLOAT32),
    "top_k": st.one_of(st.just(0), INT32),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "drafters": st.lists(st.sampled_from(["suffix", "python", "", "x" * 200]), max_size=2),
    "stop": st.lists(st.text(max_size=5), max_size=3),
})


@FUZZ
@given(fields=REQUESTS)
def test_random_requests_get_a_result_or_invalid_argument(stub, tokenizer, fields):
    expected = problems(tokenizer, fields)
    if not expected and fields["max_new_tokens"] > 3:
        fields["max_new_tokens"] = 3  # valid but long: keep the run short
    code, details, reply = complete(stub, **fields)
    if expected:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert any(fragment in details for fragment in expected), (details, expected)
    else:
        assert code == grpc.StatusCode.OK, (code, details)
        assert len(reply.token_ids) <= fields["max_new_tokens"]


@FUZZ
@given(data=st.one_of(st.binary(max_size=64), st.sampled_from(BAD_BYTES)))
def test_malformed_protobuf_bytes_are_invalid_argument(channel, data):
    try:
        parsed = router_pb2.GenerateRequest.FromString(data)
    except Exception:  # noqa: BLE001
        parsed = None
    if parsed is not None and parsed.max_new_tokens > 3:
        data = b""  # bytes that happen to parse into a long valid request: send an empty (invalid) one instead
    raw = channel.unary_unary("/specfleet.api.v1.Router/Complete")  # identity serializers: the bytes as they are
    try:
        reply = raw(data, timeout=60, metadata=METADATA)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and exc.details(), (exc.code(), exc.details())
        return
    assert parsed is not None  # only bytes that parse into a valid request may succeed
    assert len(router_pb2.GenerateResponse.FromString(reply).token_ids) <= 3


def test_an_oversized_message_is_refused_by_the_size_limit(stub):
    code, details, _ = complete(stub, prompt="a" * (17 << 20), max_new_tokens=1)  # over the 16 MiB limit
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details.lower()
    assert_still_serving(stub)


def test_the_fleet_still_serves_after_the_grpc_fuzz(stub):
    assert_still_serving(stub)


# ---------------------------------------------------------------- HTTP

def post(http, content: bytes):
    return httpx.post(f"{http}/v1/completions", content=content, headers={**HEADERS, "Content-Type":
                                                                         "application/json"}, timeout=60)


def assert_error(reply, status):
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"]


@pytest.mark.parametrize("fields,status", BAD_BODIES, ids=[json.dumps(b)[:40] for b, _ in BAD_BODIES])
def test_each_bad_http_body_gets_a_client_error(http, fields, status):
    assert_error(post(http, json.dumps({"prompt": "def f(x):", "max_tokens": 2, **fields}).encode()), status)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                 max_size=3), max_leaves=6)
BODIES = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(max_size=20), JSON),
     "max_tokens": st.one_of(st.integers(1, 3), st.integers(), JSON)},
    optional={name: JSON for name in ("temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "model",
                                      "stream_options", "echo", "logprobs")})


@FUZZ
@given(body=BODIES)
def test_random_http_bodies_never_fail_on_the_server(http, body):
    if isinstance(body["max_tokens"], int) and not isinstance(body["max_tokens"], bool) and body["max_tokens"] > 3:
        body["max_tokens"] = 10**12  # valid but long would cost time: make it too large instead
    reply = post(http, json.dumps(body).encode())
    assert reply.status_code in (200, 400, 404), reply.text
    if reply.status_code != 200:
        assert_error(reply, reply.status_code)


@FUZZ
@given(content=st.one_of(st.binary(max_size=64), st.sampled_from([b"{", b"[" * 200_000, b"\xff\xfe{}", b"nul"])))
def test_bytes_that_are_not_json_get_400(http, content):
    try:
        json.loads(content)
        return  # hypothesis found valid JSON: the body tests cover those
    except (ValueError, RecursionError):
        pass
    assert_error(post(http, content), 400)


def test_an_oversized_body_gets_413_and_the_front_still_serves(http):
    assert_error(post(http, b"x" * (2 << 20)), 413)
    reply = post(http, json.dumps({"prompt": "def f(x):", "max_tokens": 2, "temperature": 0}).encode())
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] is not None


# ---------------------------------------------------------------- a sample of the volume fuzz

def test_a_seeded_sample_of_the_volume_fuzz_gets_only_right_answers(fleet, http, stub):
    """200 inputs of `specfleet bench fuzz` (10,000 there): gRPC mutations and damaged bytes, HTTP bodies of both
    completion kinds; every answer a result or a typed client error with a message, none a hang or a 5xx."""
    report = fuzz(fleet.router_address, http, TOKEN, count=200, seed=22, workers=4)
    assert report["inputs"] == 200 and report["grpc_inputs"] > 50 and report["http_inputs"] > 50
    assert report["wrong_answers"] == 0, report["wrong_examples"]
    assert_still_serving(stub)


# ---------------------------------------------------------------- admission control

def test_beyond_max_concurrent_the_router_answers_resource_exhausted_at_once(fleet, stub, http):
    router = fleet.services["router"]
    saved = router.config.max_concurrent
    router.config.max_concurrent = 2

    async def hold_two_and_ask_a_third():
        async with grpc.aio.insecure_channel(fleet.router_address) as channel:
            aio = router_pb2_grpc.RouterStub(channel)
            long = [aio.Generate(router_pb2.GenerateRequest(prompt_token_ids=[5, 6, 7], max_new_tokens=600,
                                                            ignore_eos=True), timeout=120, metadata=METADATA)
                    for _ in range(2)]
            for call in long:
                await call.read()  # both are live now
            assert router.live == 2
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await aio.Complete(router_pb2.GenerateRequest(prompt_token_ids=[5], max_new_tokens=2), timeout=60,
                                   metadata=METADATA)
            reply = await asyncio.to_thread(post, http, json.dumps({"prompt": "x", "max_tokens": 2}).encode())
            still_live = router.live
            for call in long:
                call.cancel()
            return err.value, reply, still_live

    try:
        error, reply, still_live = asyncio.run(hold_two_and_ask_a_third())
    finally:
        router.config.max_concurrent = saved
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at capacity" in error.details()
    assert still_live == 2  # refused while the others ran, not after them: no waiting in a queue
    assert_error(reply, 429)
    assert_still_serving(stub)
