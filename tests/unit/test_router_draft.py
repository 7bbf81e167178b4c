"""The router's draft step against stand-in drafter pools (no network): the fusion RPC is made only when at least two
pools drafted something, and a lone non-empty draft among several pools becomes exactly the tree the fusion service
would have returned (deduplicated, siblings by confidence, cut to max_fused_nodes, every node credited to its pool)."""

import asyncio

import torch

from specfleet.api.v1 import internal_pb2, internal_pb2_grpc
from specfleet.engine.sampling import SamplingParams
from specfleet.engine.tree import TokenTree
from specfleet.fusion.service import FusionService
from specfleet.router import service as router_service
from specfleet.router.service import FleetConfig, RouterService
from specfleet.runtime.wire import tree_from_pb, tree_to_pb

VOCAB = 100
GREEDY = SamplingParams(0.0, 1.0, 0, None)


def tree(tokens, parents, probs) -> internal_pb2.TokenTree:
    return tree_to_pb(TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
                                torch.tensor(probs, dtype=torch.float32)))


EMPTY = tree([], [], [])
# siblings out of confidence order, a duplicated root and more nodes than the cut keeps (4 most confident, each
# with its parent: 7 -> 11): fusion rewrites it
ODD = tree([5, 7, 5, 9, 11, 12], [-1, -1, -1, 0, 1, 3], [0.2, 0.9, 0.4, 0.8, 0.7, 0.6])
OTHER = tree([5, 8], [-1, 0], [0.5, 0.5])


class Pool:
    def __init__(self, draft: internal_pb2.TokenTree):
        self.draft, self.calls = draft, 0

    async def Draft(self, request, timeout=None, metadata=None):
        self.calls += 1
        return internal_pb2.DraftResponse(trees=[self.draft], drafter="stand-in", seconds=0.001)


class Fusion:
    """The real fusion handler behind a stub's face, counting calls."""

    calls = 0

    def __init__(self, channel):
        pass

    async def Fuse(self, request, timeout=None, metadata=None):
        Fusion.calls += 1
        return await FusionService(VOCAB).Fuse(request, None)


def router(pools: dict[str, Pool], max_nodes: int = 4) -> RouterService:
    config = FleetConfig(drafters={name: f"127.0.0.1:{i + 1}" for i, name in enumerate(pools)},
                         verifiers=["127.0.0.1:9"], fusion="127.0.0.1:8", verify_queue="rpc", discover_s=0,
                         max_fused_nodes=max_nodes)
    service = RouterService(config, store=None, tokenizer=None, max_positions=512, vocab_size=VOCAB,
                            eos_token_id=None)
    service._drafter = lambda pool, rid="": pools[pool]
    service._channel = lambda address: None
    return service


def draft(service: RouterService, pools: list[str]) -> TokenTree:
    return asyncio.run(service._draft("r", [1, 2, 3], 3, pools, GREEDY, 2))[0]


def fused_by_the_service(drafts: list[internal_pb2.TokenTree], names: list[str], max_nodes: int) -> TokenTree:
    request = internal_pb2.FuseRequest(request_id="r", drafts=drafts, drafters=names, max_nodes=max_nodes)
    return tree_from_pb(asyncio.run(FusionService(VOCAB).Fuse(request, None)).tree, VOCAB)


def same(a: TokenTree, b: TokenTree) -> bool:
    return (a.tokens.tolist(), a.parents.tolist(), a.probs.tolist(), a.origins) == \
        (b.tokens.tolist(), b.parents.tolist(), b.probs.tolist(), b.origins)


def test_one_non_empty_draft_of_several_is_the_fusion_services_tree_without_its_rpc(monkeypatch):
    monkeypatch.setattr(internal_pb2_grpc, "FusionStub", Fusion)
    Fusion.calls = 0
    pools = {"python": Pool(ODD), "suffix": Pool(EMPTY), "prose": Pool(EMPTY)}
    got = draft(router(pools), list(pools))
    assert Fusion.calls == 0 and all(p.calls == 1 for p in pools.values())
    want = fused_by_the_service([ODD, EMPTY, EMPTY], ["python", "suffix", "prose"], 4)
    assert same(got, want) and len(got) == 2 and set(got.origins) == {("python",)}


def test_nothing_drafted_makes_no_fusion_rpc(monkeypatch):
    monkeypatch.setattr(internal_pb2_grpc, "FusionStub", Fusion)
    Fusion.calls = 0
    got = draft(router({"python": Pool(EMPTY), "suffix": Pool(EMPTY)}), ["python", "suffix"])
    assert Fusion.calls == 0 and len(got) == 0


def test_two_non_empty_drafts_are_fused_by_the_service_empty_ones_left_out(monkeypatch):
    monkeypatch.setattr(router_service.internal_pb2_grpc, "FusionStub", Fusion)
    Fusion.calls = 0
    pools = {"python": Pool(ODD), "suffix": Pool(EMPTY), "prose": Pool(OTHER)}
    got = draft(router(pools, max_nodes=24), list(pools))
    assert Fusion.calls == 1
    assert same(got, fused_by_the_service([ODD, EMPTY, OTHER], ["python", "suffix", "prose"], 24))
    assert ("prose", "python") in got.origins  # the shared root 5 is credited to both


def test_a_single_routed_pool_keeps_its_draft_as_it_came(monkeypatch):
    monkeypatch.setattr(internal_pb2_grpc, "FusionStub", Fusion)
    Fusion.calls = 0
    got = draft(router({"python": Pool(ODD), "suffix": Pool(EMPTY)}), ["python"])
    assert Fusion.calls == 0 and got.tokens.tolist() == [5, 7, 5, 9, 11, 12]
