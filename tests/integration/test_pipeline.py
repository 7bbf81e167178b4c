"""Pipelined drafting (PipeInfer-style) and the CoSine ablation switches through the real fleet: drafts made during
verification are used when it confirms their assumption and dropped otherwise, and every switch setting gives the
target's own output: greedy equal to its greedy decoding, sampled equal to the engine's plain decoding under the same
seed (the sampling stream is keyed by request seed and output position, whoever drafted)."""

import asyncio
import uuid

import grpc
import pytest
import torch

from specfleet.api.v1 import router_pb2, router_pb2_grpc
from specfleet.bench.fleet_bench import delete_prefix
from specfleet.engine.engine import Request
from specfleet.engine.factory import build_engine
from specfleet.engine.sampling import SamplingParams
from specfleet.fleet import LocalFleet, ServeOptions

REDIS_URL = "redis://127.0.0.1:6379/0"
NEW_TOKENS = 24
PROMPTS = ("def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n", "The server stores the request. The server",
           "#include <stdio.h>\n#include <stdlib.h>\n#include", "for i in range(10):\n    print(i)\nfor i in")
SAMPLED = SamplingParams(0.8, 0.95, 0, 11)


@pytest.fixture(scope="module", params=[
    dict(), dict(pipeline=False), dict(routing=False), dict(fusion=False), dict(adaptive=False)],
    ids=["all-on", "no-pipeline", "no-routing", "no-fusion", "no-adaptive"])
def fleet(request, models_dir):
    prefix = f"sftest-pipe-{uuid.uuid4().hex[:8]}"
    opts = ServeOptions(models_dir, redis_url=REDIS_URL, key_prefix=prefix, slots=8, heartbeat_s=0)
    with LocalFleet(opts, pools=("python", "suffix"), **request.param) as running:
        yield running
    delete_prefix(REDIS_URL, prefix)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def greedy_refs(load_model, prompt_ids, tokenizer):
    target = load_model("target")
    with torch.no_grad():
        return [target.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist() for p in prompt_ids]


@pytest.fixture(scope="module")
def sampled_refs(load_model, prompt_ids, models_dir):
    engine = build_engine(models_dir, "none", (), batch_size=4, k=1, adaptive=False, target=load_model("target"))
    results = engine.generate([Request(f"s{i}", p, NEW_TOKENS, SAMPLED) for i, p in enumerate(prompt_ids)])
    return [r.token_ids for r in results]


def _run_all(address, prompt_ids, params: SamplingParams | None):
    async def one(stub, ids):
        fields = dict(prompt_token_ids=ids, max_new_tokens=NEW_TOKENS, request_id=uuid.uuid4().hex)
        if params is not None:
            fields.update(temperature=params.temperature, top_p=params.top_p, seed=params.seed)
        reply = await stub.Complete(router_pb2.GenerateRequest(**fields), timeout=120)
        return list(reply.token_ids)

    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            return await asyncio.gather(*(one(stub, ids) for ids in prompt_ids))

    return asyncio.run(run())


def test_greedy_output_is_the_targets_for_every_switch(fleet, prompt_ids, greedy_refs):
    assert _run_all(fleet.router_address, prompt_ids, None) == greedy_refs
    router = fleet.services["router"]
    if fleet.pipeline:
        assert router.used_ahead > 0, "no round used a draft made during the previous verification"
    else:
        assert router.used_ahead == router.cancelled_ahead == 0


def test_sampled_output_equals_plain_decoding_under_the_same_seed(fleet, prompt_ids, sampled_refs):
    assert _run_all(fleet.router_address, prompt_ids, SAMPLED) == sampled_refs
