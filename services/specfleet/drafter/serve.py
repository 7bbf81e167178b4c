"""Starting a drafter pool's service (`specfleet serve drafter --pool NAME`, or in-process)."""

from __future__ import annotations

from specfleet.api.v1 import internal_pb2_grpc
from specfleet.runtime.process import ServeOptions, publish_heartbeat, start_service
from specfleet.runtime.server import Running

DRAFTER_POOLS = ("python", "prose", "c", "general")  # the bundled drafters; --drafter NAME=PATH adds others
MODEL_FREE_POOLS = ("suffix", "ngram")


async def start_drafter(pool: str, opts: ServeOptions, port: int = 0) -> tuple[Running, object]:
    from specfleet.drafter.service import DrafterService
    from specfleet.engine.factory import build_proposer
    from specfleet.engine.models import ModelSet, check_compatible

    models = ModelSet.of(opts.models)
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
