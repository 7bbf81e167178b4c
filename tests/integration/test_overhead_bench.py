"""The overhead stage's hop-by-hop profile (`specfleet bench fleet --stages overhead`) on the smallest models (1-layer,
random weights, the bundled tokenizer) over real gRPC on loopback and the real Redis: every round's message carries
its timings when asked (and only then), the table has every hop, each figure is a non-negative number, and the
output stays the target's own plain decoding. Correctness only: the figures themselves come from the benchmark."""

import asyncio
import uuid

import grpc
import pytest

from specfleet.api.v1 import router_pb2, router_pb2_grpc
from specfleet.bench.fleet_bench import delete_prefix
from specfleet.bench.overhead import HOPS, SUMMARY, format_hops, profile, tiny_models
from specfleet.local.inprocess import LocalFleet
from specfleet.runtime.process import ServeOptions

REDIS_URL = "redis://127.0.0.1:6379/0"
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def tiny(models_dir, tmp_path_factory):
    return tiny_models(models_dir, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module", params=["stream", "rpc"])
def fleet(request, tiny):
    prefix = f"sftest-hops-{uuid.uuid4().hex[:8]}"
    with LocalFleet(ServeOptions(tiny, redis_url=REDIS_URL, key_prefix=prefix, slots=8),
                    pools=("python", "prose", "c", "suffix"), adaptive=False, pipeline=False, dsi=False,
                    verify_queue=request.param) as running:
        yield running
    delete_prefix(REDIS_URL, prefix)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["def main():\n    return", "The river ran past the", "int main(void) {", "import numpy as np\n"]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


@pytest.fixture(scope="module")
def references(tiny, prompts):
    from specfleet.engine.engine import Request
    from specfleet.engine.factory import build_engine

    engine = build_engine(tiny, "none", batch_size=4)
    return [r.token_ids for r in engine.generate([Request(f"r{i}", p, NEW_TOKENS, ignore_eos=True)
                                                  for i, p in enumerate(prompts)])]


def test_tiny_models_share_the_bundled_vocabulary(tiny, models_dir):
    from transformers import AutoConfig

    bundled = AutoConfig.from_pretrained(str(models_dir / "target"))
    for name in ("target", "drafter-python", "drafter-prose", "drafter-c"):
        config = AutoConfig.from_pretrained(str(tiny / name))
        assert config.num_hidden_layers == 1 and config.vocab_size == bundled.vocab_size
        assert (tiny / name / "tokenizer.json").exists()


@pytest.mark.parametrize("concurrency", [1, 3])
def test_every_hop_is_reported_non_negative_and_the_output_is_the_targets(fleet, prompts, references, concurrency):
    run = profile(fleet.router_address, prompts, NEW_TOKENS, concurrency)
    assert run["outputs"] == references
    names = [h for h, _, _ in HOPS] + [s for s, _ in SUMMARY]
    assert list(run["hops_ms"]) == names
    for hop, figures in run["hops_ms"].items():
        assert set(figures) == {"p50", "p99", "mean"}
        assert all(isinstance(v, float) and v >= 0 for v in figures.values()), (hop, figures)
        assert figures["p50"] <= figures["p99"], hop
    # each round drafts and verifies in turn (no pipelining): those hops took time; through the stream queue the
    # commit is the answer's own Redis script, so it is measured in `answer`. Fusion runs only in the rounds that
    # fuse every pool (a request's warm-up -- none once its kind's requests have ranked the pools: it starts routed
    # -- then every few rounds); the others draft with the routed pool alone, so a short run may fuse nothing
    stream = fleet.verify_queue == "stream"
    for hop in ("draft_rpc", "queue", "verify_forward", "answer", "round", *(() if stream else ("commit",))):
        assert run["hops_ms"][hop]["p50"] > 0, hop
    if stream:
        assert run["hops_ms"]["commit"]["p99"] == 0
    # rounds after the first of each stream (the first has no gap to measure)
    assert run["rounds"] >= len(prompts) * 2
    lines = format_hops("tiny", {"models": "tiny", "flags": [], "runs": [{**run, "identical_outputs": "4/4"}]})
    assert any(line.startswith("verify_forward") for line in lines)


def test_timings_only_when_asked(fleet, prompts):
    async def stream(**extra):
        async with grpc.aio.insecure_channel(fleet.router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            return [m async for m in stub.Generate(router_pb2.GenerateRequest(
                prompt_token_ids=prompts[0], max_new_tokens=6, ignore_eos=True, **extra), timeout=60)]

    plain = asyncio.run(stream())
    assert plain and not any(m.HasField("timings") for m in plain)
    timed = asyncio.run(stream(round_timings=True))
    assert all(m.HasField("timings") for m in timed)
    assert all(m.timings.forward_s > 0 and m.timings.verify_s >= m.timings.forward_s for m in timed)
    assert [t for m in timed for t in m.token_ids] == [t for m in plain for t in m.token_ids]
