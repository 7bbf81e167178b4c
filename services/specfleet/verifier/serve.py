"""Starting a verifier (`specfleet serve verifier`, or in-process): the target, its cost-model cap, the verify
stream consumer and the heartbeat."""

from __future__ import annotations

import logging

from specfleet.api.v1 import internal_pb2_grpc
from specfleet.runtime.process import ServeOptions, open_store, publish_heartbeat, start_service
from specfleet.runtime.server import Running

log = logging.getLogger("specfleet.fleet")


async def start_verifier(opts: ServeOptions, port: int = 0) -> tuple[Running, object]:
    from specfleet.engine.factory import load_model
    from specfleet.engine.models import ModelSet
    from specfleet.verifier.service import VerifierService

    target = load_model(opts.models, "target")  # on the serving thread: see Batcher
    store = await open_store(opts)
    cap = opts.max_batch_tokens
    if not cap and opts.profile is not None:
        from specfleet.engine.profile import load, max_batch_tokens

        cap = max_batch_tokens(load(opts.profile), opts.max_batch_latency_ms)
        log.info("verifier: at most %d tokens per forward (profile %s, %.0f ms bound)", cap, opts.profile,
                 opts.max_batch_latency_ms)
    # with a draft head in the model set the verifier keeps each request's features (one row of the target's width per
    # cached token) and returns a round's new rows to a router that asks (its head pool drafts from them)
    features = ModelSet.of(opts.models).head is not None
    service = VerifierService(target, slots=opts.slots, store=store, max_batch_tokens=cap, limits=opts.kv_limits(),
                              features=features)
    if service.verifier.runner.slots < opts.slots:
        log.warning("verifier: the KV cache budget holds %d of the %d slots asked for; further requests wait",
                    service.verifier.runner.slots, opts.slots)
    running = await start_service(opts, internal_pb2_grpc.add_VerifierServicer_to_server, service,
                                  "specfleet.api.v1.Verifier", port)
    if opts.verify_stream:
        from specfleet.state.heartbeat import pod_name
        from specfleet.verifier.queue import VerifyConsumer

        consumer = opts.pod or pod_name("verifier", running.port)
        intake = max(1, min(service.verifier.runner.slots, opts.verify_intake))
        running.consumer = service.consumer = VerifyConsumer(service, store, consumer, capacity=intake).start()
    await publish_heartbeat(opts, "verifier", running, service.snapshot, store=store)
    return running, service
