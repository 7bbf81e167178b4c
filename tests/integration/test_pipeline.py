"""Pipelined drafting (PipeInfer-style) and the CoSine ablation switches through the real fleet: drafts made during
verification are used when it confirms their assumption and dropped otherwise, and every switch setting gives the
target's own output: greedy equal to its greedy decoding, sampled equal to the engine's plain decoding under the same
seed (the sampling stream is keyed by request seed and output position, whoever drafted)."""

import uuid

import pytest

from specfleet.bench.fleet_bench import delete_prefix
from specfleet.local.inprocess import LocalFleet
from specfleet.runtime.process import ServeOptions

from .switches import SAMPLED, run_all

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module", params=[
    dict(), dict(pipeline=False), dict(routing=False), dict(fusion=False), dict(adaptive=False)],
    ids=["all-on", "no-pipeline", "no-routing", "no-fusion", "no-adaptive"])
def fleet(request, models_dir):
    prefix = f"sftest-pipe-{uuid.uuid4().hex[:8]}"
    opts = ServeOptions(models_dir, redis_url=REDIS_URL, key_prefix=prefix, slots=8, heartbeat_s=0)
    with LocalFleet(opts, pools=("python", "suffix"), **request.param) as running:
        yield running
    delete_prefix(REDIS_URL, prefix)


def test_greedy_output_is_the_targets_for_every_switch(fleet, prompt_ids, greedy_refs):
    assert run_all(fleet.router_address, prompt_ids, None) == greedy_refs
    router = fleet.services["router"]
    if fleet.pipeline and not fleet.adaptive:
        # fixed k: every round drafts, so the repetitive prompts' fully accepted rounds use their drafts made ahead
        # (under the adaptive controller a loaded machine may price drafting out: whether it drafts is timing)
        assert router.used_ahead > 0, "no round used a draft made during the previous verification"
    elif not fleet.pipeline:
        assert router.used_ahead == router.cancelled_ahead == 0


def test_sampled_output_equals_plain_decoding_under_the_same_seed(fleet, prompt_ids, sampled_refs):
    assert run_all(fleet.router_address, prompt_ids, SAMPLED) == sampled_refs
