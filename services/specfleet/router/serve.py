"""Starting the public router (`specfleet serve router`, or in-process)."""

from __future__ import annotations

import asyncio

from specfleet.api.v1 import router_pb2_grpc
from specfleet.engine.models import ModelSet
from specfleet.runtime.process import ServeOptions, open_store, publish_heartbeat, start_service
from specfleet.runtime.security import ChannelTls
from specfleet.runtime.server import Running


async def start_router(opts: ServeOptions, config, port: int = 0, internal_token: str | None = None,
                       internal_tls: ChannelTls | None = None) -> tuple[Running, object]:
    """The public router; `internal_token` / `internal_tls` are what it presents to the internal services."""
    from transformers import AutoConfig, AutoTokenizer

    from specfleet.router.service import RouterService
    from specfleet.runtime.ratelimit import RateLimiter

    target = ModelSet.of(opts.models).target
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(target))
    model_cfg = AutoConfig.from_pretrained(str(target))
    config.internal_token = internal_token
    if internal_tls is not None:
        config.internal_tls = internal_tls
    store = await open_store(opts)
    context = min(model_cfg.max_position_embeddings, opts.max_model_len or model_cfg.max_position_embeddings)
    service = RouterService(config, store, tokenizer, context,
                            model_cfg.vocab_size, model_cfg.eos_token_id)
    running = await start_service(opts, router_pb2_grpc.add_RouterServicer_to_server, service,
                                  "specfleet.api.v1.Router", port, RateLimiter(opts.rate_limit_rps,
                                                                               opts.rate_limit_tpm))
    from specfleet.state.heartbeat import advertised_address

    service.address = advertised_address(opts.host, running.port)
    running.on_stop = service.start_handover
    running.on_drain_mark = lambda marked: service.start_handover() if marked else service.stop_handover()
    service.ensure_discovery()
    await publish_heartbeat(opts, "router", running, service.snapshot, store=store)
    return running, service
