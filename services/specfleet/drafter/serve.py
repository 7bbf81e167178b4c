"""Starting a drafter pool's service (`specfleet serve drafter --pool NAME`, or in-process)."""

from __future__ import annotations

from specfleet.api.v1 import internal_pb2_grpc
from specfleet.runtime.process import ServeOptions, publish_heartbeat, start_service
from specfleet.runtime.server import Running

DRAFTER_POOLS = ("python", "prose", "c", "general")  # the bundled drafters; --drafter NAME=PATH adds others
MODEL_FREE_POOLS = ("suffix", "ngram")
HEAD_POOL = "head"  # the draft head (ModelSet.head): drafts from the target's features the router passes on


async def start_drafter(pool: str, opts: ServeOptions, port: int = 0) -> tuple[Running, object]:
    from specfleet.drafter.service import DrafterService
    from specfleet.engine.factory import build_proposer
    from specfleet.engine.models import ModelSet, check_compatible

    models = ModelSet.of(opts.models)
    if pool == HEAD_POOL:
        return await _start_head(models, opts, port)
    kind = pool if pool in MODEL_FREE_POOLS else "model"
    names = () if kind != "model" else (pool,)
    if kind == "model" and (models.target / "config.json").exists():  # refused before serving, not per request
        check_compatible(models.target, models.drafter(pool), pool)
    proposer = build_proposer(kind, models, names, opts.slots, opts.kv_limits())  # on the serving thread: see Batcher
    vocab = 1 << 31
    if kind == "model":
        vocab = next(iter(proposer.drafters.values())).runner.vocab_size
    service = DrafterService(proposer, pool, capacity=opts.slots, vocab_size=vocab)
    running = await start_service(opts, internal_pb2_grpc.add_DrafterServicer_to_server, service,
                                  "specfleet.api.v1.Drafter", port)
    await publish_heartbeat(opts, "drafter", running, service.snapshot, {"pool": pool})
    return running, service


async def _start_head(models, opts: ServeOptions, port: int) -> tuple[Running, object]:
    from specfleet.drafter.head import HeadFeatures, HeadPoolProposer
    from specfleet.drafter.service import DrafterService
    from specfleet.engine.factory import build_head, load_model

    if models.head is None:  # refused before serving, not per request
        raise ValueError("drafter pool head needs a draft head in the model set: train one with `specfleet train "
                         "head` (it lands in MODELS/head) or give --head PATH")
    target = load_model(models, "target")  # on the serving thread: see Batcher
    head = build_head(models, opts.slots, opts.kv_limits(), target)
    proposer = HeadPoolProposer(head, HeadFeatures(target, opts.kv_limits()))
    service = DrafterService(proposer, HEAD_POOL, capacity=opts.slots, vocab_size=target.config.vocab_size,
                             feature_width=target.config.hidden_size)
    running = await start_service(opts, internal_pb2_grpc.add_DrafterServicer_to_server, service,
                                  "specfleet.api.v1.Drafter", port)
    await publish_heartbeat(opts, "drafter", running, service.snapshot, {"pool": HEAD_POOL})
    return running, service
