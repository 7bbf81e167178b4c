"""What the fleet switch tests share (test_pipeline: the CoSine ablation switches; test_dsi: speculation parallelism
and the verify queue): four short mixed-domain prompts, the sampling they use, and a runner that streams them all
through a router; the target's own outputs for them are fixtures in conftest.py."""

import asyncio
import uuid

import grpc

from specfleet.engine.sampling import SamplingParams

NEW_TOKENS = 24
PROMPTS = ("def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n", "The server stores the request. The server",
           "#include <stdio.h>\n#include <stdlib.h>\n#include", "for i in range(10):\n    print(i)\nfor i in")
SAMPLED = SamplingParams(0.8, 0.95, 0, 11)


def run_all(address: str, prompt_ids: list[list[int]], params: SamplingParams | None) -> list[list[int]]:
    """Streams every prompt concurrently through the router; checks each stream's offsets and round count."""
    from specfleet.api.v1 import router_pb2, router_pb2_grpc

    async def one(stub, ids):
        fields = dict(prompt_token_ids=ids, max_new_tokens=NEW_TOKENS, request_id=uuid.uuid4().hex)
        if params is not None:
            fields.update(temperature=params.temperature, top_p=params.top_p, seed=params.seed)
        messages = [m async for m in stub.Generate(router_pb2.GenerateRequest(**fields), timeout=120)]
        offsets = [m.offset for m in messages]
        assert offsets == [sum(len(m.token_ids) for m in messages[:i]) for i in range(len(messages))]
        assert messages[-1].usage.rounds == len(messages)
        return [t for m in messages for t in m.token_ids]

    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            return await asyncio.gather(*(one(stub, ids) for ids in prompt_ids))

    return asyncio.run(run())
