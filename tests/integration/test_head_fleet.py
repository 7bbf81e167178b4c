"""The draft head as a fleet pool over real gRPC on loopback with the real Redis: the verifier returns each round's
new feature rows, the router passes them to the `head` pool, which drafts from them -- output identical to the
target's own (greedy, and seeded sampled), the head's features always the target's features of the context, and a
head replica that lost them (a fresh replica) rebuilds them from the context. A random-weight head built here is
used: the test needs no trained head in models/."""

import asyncio
import uuid

import grpc
import pytest
import torch

from specfleet.api.v1 import internal_pb2, router_pb2, router_pb2_grpc
from specfleet.bench.fleet_bench import delete_prefix
from specfleet.drafter.head import HeadFeatures
from specfleet.engine.models import ModelSet
from specfleet.local.inprocess import LocalFleet
from specfleet.router.service import PendingFeatures
from specfleet.runtime.process import ServeOptions
from specfleet.runtime.wire import features_from_pb, features_to_pb

from .switches import NEW_TOKENS, SAMPLED, run_all
from conftest import write_random_head

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def head_models(tmp_path_factory, load_model, models_dir):
    """The bundled models with a random-weight head of a trained head's scale (its drafts are not constant)."""
    out = write_random_head(tmp_path_factory.mktemp("head") / "head", load_model("target"))
    return ModelSet.bundled(models_dir).with_overrides(head=out)


@pytest.fixture(scope="module")
def fleet(head_models):
    prefix = f"sfhead-{uuid.uuid4().hex[:8]}"
    with LocalFleet(ServeOptions(head_models, redis_url=REDIS_URL, key_prefix=prefix, slots=8), pools=("head",),
                    adaptive=False) as running:  # every round drafts with the head
        yield running
    delete_prefix(REDIS_URL, prefix)


def _target_features(target, ids):
    with torch.no_grad():
        return target.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


@pytest.fixture()
def drafted(fleet):
    """Every (context, features) the head drafts from in the fleet during a test."""
    proposer = fleet.services["drafter-head"].proposer
    seen, original = [], proposer.head.propose

    def spy(batch):
        seen.extend((list(d.context), d.features.clone()) for d in batch if d.features is not None)
        return original(batch)

    proposer.head.propose = spy
    yield seen
    proposer.head.propose = original


def _check_features(target, seen):
    """The head drafted from the target's features of context[:-1] every time (fp16 on the wire: to its precision)."""
    assert seen
    for context, feats in seen:
        assert feats.shape[0] == len(context) - 1
        want = _target_features(target, context[:-1])
        assert torch.allclose(feats.float(), want, atol=2e-2, rtol=1e-2), (feats.float() - want).abs().max()


def test_head_pool_output_equals_target_greedy(fleet, prompt_ids, greedy_refs, drafted, load_model):
    service = fleet.services["drafter-head"]
    verifier = fleet.services["verifier-0"]
    carried, rounds = service.proposer.features.carried_rows, verifier.feature_rounds
    assert run_all(fleet.router_address, prompt_ids, None) == greedy_refs
    assert service.proposer.features.carried_rows > carried  # the rows came from the verifier through the router
    assert service.proposer.features.rebuilds == 0  # ... and covered every context: no target forward on the head pod
    assert verifier.feature_rounds > rounds
    _check_features(load_model("target"), drafted)
    # the wire cost: one fp16 row of the target's width per token the round added
    width = load_model("target").config.hidden_size
    assert verifier.feature_bytes % (2 * width) == 0


def test_head_pool_seeded_sampled_output_equals_the_engine(fleet, prompt_ids, sampled_refs):
    assert run_all(fleet.router_address, prompt_ids, SAMPLED) == sampled_refs


def test_a_fresh_head_replica_mid_request_rebuilds_the_features(fleet, prompt_ids, greedy_refs, drafted, load_model):
    """Once the head has drafted for the request, the head pool forgets it between streamed messages (what a fresh
    replica after a failover has): its next draft finds a gap between its rows and the ones the router carries and
    rebuilds them from the context with one target forward; the output is the target's and the head never drafts
    from wrong features."""
    service = fleet.services["drafter-head"]
    proposer = service.proposer
    rebuilds = proposer.features.rebuilds

    def forget_all():
        with service.lock:
            if proposer.features.rebuilds == rebuilds:  # until one rebuild happened
                for rid in list(proposer.features.held):
                    proposer.stop(rid, [])

    async def one():
        async with grpc.aio.insecure_channel(fleet.router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            request = router_pb2.GenerateRequest(prompt_token_ids=prompt_ids[1], max_new_tokens=NEW_TOKENS)
            tokens = []
            async for message in stub.Generate(request, timeout=120):
                await asyncio.to_thread(forget_all)
                tokens += message.token_ids
            return tokens

    assert asyncio.run(one()) == greedy_refs[1]
    assert proposer.features.rebuilds > rebuilds
    _check_features(load_model("target"), drafted)


def test_head_features_cover_rebuild_and_drop_rows_of_other_tokens(load_model):
    """HeadFeatures: carried rows contiguous with the held ones are taken; rows of tokens the context no longer has are
    dropped; a gap (or nothing held) is rebuilt from the context -- always the target's features of context[:-1]."""
    target = load_model("target")
    keeper = HeadFeatures(target)
    context = list(range(300, 320))
    full = _target_features(target, context)
    got = keeper.cover("a", context[:11], None)  # nothing held: rebuilt
    assert keeper.rebuilds == 1 and torch.allclose(got, full[:10], atol=1e-4)
    got = keeper.cover("a", context[:16], (10, full[10:15]))  # contiguous rows: taken, no forward
    assert keeper.rebuilds == 1 and keeper.carried_rows == 5 and torch.allclose(got, full[:15], atol=1e-4)
    got = keeper.cover("a", context, (17, full[17:19]))  # a gap (rows 15, 16 never came): rebuilt
    assert keeper.rebuilds == 2 and torch.allclose(got, full[:19], atol=1e-4)
    other = context[:12] + [7, 8, 9, 10]  # the tail rewritten: its rows are not the held ones
    got = keeper.cover("a", other, (12, torch.zeros(3, full.shape[1])))  # ... carried from the rewrite point: taken
    assert keeper.rebuilds == 2 and torch.allclose(got[:12], full[:12], atol=1e-4) and not got[12:].any()
    got = keeper.cover("a", other + [11], None)  # one row short and nothing carried: rebuilt, never guessed
    assert keeper.rebuilds == 3 and torch.allclose(got, _target_features(target, other), atol=1e-4)


def test_feature_rows_on_the_wire_and_in_the_router():
    rows = torch.randn(5, 8)
    for dtype, atol in (("float16", 1e-2), ("bfloat16", 5e-2), ("float32", 0.0)):
        msg = features_to_pb(rows, 3, dtype)
        assert (msg.first, msg.rows, msg.width, msg.dtype) == (3, 5, 8, dtype)
        assert len(msg.data) == 5 * 8 * (4 if dtype == "float32" else 2)
        assert torch.allclose(features_from_pb(msg, 8), rows, atol=atol, rtol=1e-2)
    with pytest.raises(ValueError, match="width"):
        features_from_pb(features_to_pb(rows, 0), 16)
    with pytest.raises(ValueError, match="bytes"):
        features_from_pb(internal_pb2.Features(first=0, rows=2, width=8, dtype="float16", data=b"\0" * 8), 8)
    pending = PendingFeatures()
    assert pending.take() is None
    pending.add(features_to_pb(rows[:3], 0, "float32"))
    pending.add(features_to_pb(rows[3:], 2, "float32"))  # from row 2 on: replaces the pending row 2
    sent = pending.take()
    assert (sent.first, sent.rows) == (0, 4)
    assert torch.equal(features_from_pb(sent), torch.cat([rows[:2], rows[3:]]))
    assert pending.take() is None
    pending.add(features_to_pb(rows[:2], 9, "float32"))  # after rows already sent: these alone (the pool fills gaps)
    assert (pending.take().first, pending.rows) == (9, 0)


def test_a_head_pool_without_a_head_is_refused(models_dir):
    from specfleet.drafter.serve import start_drafter

    models = ModelSet(models_dir / "target", {})
    with pytest.raises(ValueError, match="needs a draft head"):
        asyncio.run(start_drafter("head", ServeOptions(models)))


def test_up_refuses_a_head_pool_without_a_head(models_dir):
    """--target replaces the bundled head too (a head reads one target's features): a head pool is then refused
    before anything starts, saying how to get a head."""
    import subprocess
    import sys

    from specfleet.state.embedded import free_port

    cmd = [sys.executable, "-m", "specfleet.cli", "up", "--grpc-port", str(free_port()), "--pools", "head",
           "--target", str(models_dir / "target"), "--redis-url", REDIS_URL, "--http-port", "-1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "drafter pool head needs a draft head" in done.stderr, done.stderr[-2000:]
