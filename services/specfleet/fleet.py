"""Starting the fleet's services: one role per process (`specfleet serve ROLE`), all of them as local processes
(`specfleet up`), or all in one process on one event loop (`LocalFleet`, for tests and benchmarks). Every service
listens on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from specfleet.api.v1 import internal_pb2_grpc, router_pb2_grpc
from specfleet.security import ChannelTls, ServerTls
from specfleet.server import Running, start_server

log = logging.getLogger("specfleet.fleet")
DRAFTER_POOLS = ("python", "prose", "c", "general")
MODEL_FREE_POOLS = ("suffix", "ngram")


@dataclass
class ServeOptions:
    models: Path
    redis_url: str | None = None
    host: str = "127.0.0.1"
    # accepted bearer token(s): the public router's (one per caller) / the shared internal token (internal services)
    token: str | tuple[str, ...] | None = None
    slots: int = 32  # concurrent requests with a KV cache per drafter / verifier replica
    key_prefix: str = "sf"
    heartbeat_s: float = 2.0  # load published to Redis this often (when a Redis URL is given); 0: never
    pod: str | None = None  # heartbeat id; default SPECFLEET_POD_NAME or host-role-port
    profile: Path | None = None  # verifier: `specfleet profile` output; caps a forward's tokens to max_batch_latency_ms
    max_batch_latency_ms: float = 50.0
    max_batch_tokens: int = 0  # verifier: an explicit token cap per forward (overrides the profile's)
    tls: ServerTls | None = None  # the service's certificate; with a client CA, callers need a certificate (mTLS)
    rate_limit_rps: float = 0.0  # router: requests per second per caller token (0: no limit)
    rate_limit_tpm: float = 0.0  # router: generated tokens per minute per caller token (0: no limit)
    verify_stream: bool = True  # verifier: also take rounds from the Redis stream `{prefix}:stream:verify`
    # verifier: the most stream rounds it holds at once (at most `slots`). The rest wait in the stream, first come first
    # served across verifiers and visible to the operator as depth: a verifier that took more than its next forwards
    # can use would have them wait inside it, where the router's timeout and other verifiers' reclaims find them
    verify_intake: int = 32
    health_port: int | None = None  # also answer health checks (only) in plaintext here: kubelet probes under mTLS


async def _start(opts: ServeOptions, add, servicer, name: str, port: int, rate_limiter=None) -> Running:
    return await start_server([(add, servicer)], [name], opts.host, port, opts.token, opts.tls, rate_limiter,
                              opts.health_port)


async def _publish(opts: ServeOptions, role: str, running: Running, snapshot, extra: dict | None = None,
                   store=None) -> None:
    """Starts the service's heartbeat (load + NVML readings to Redis); a draining mark flips its health."""
    from specfleet.state.heartbeat import HeartbeatPublisher, advertised_address, pod_name

    if opts.heartbeat_s <= 0 or not (store or opts.redis_url):
        return
    store = store or await _store(opts)
    pod = opts.pod or pod_name(role, running.port)

    async def on_drain(draining: bool) -> None:
        if running.consumer is not None:  # a draining verifier takes no more rounds from the stream
            running.consumer.pause(draining)
        await running.set_serving(not draining)

    running.publisher = HeartbeatPublisher(store, role, pod, advertised_address(opts.host, running.port), snapshot,
                                           on_drain, opts.heartbeat_s, extra).start()


def _load(models: Path, name: str):
    from specfleet.engine.factory import load_model

    return load_model(models, name)


async def start_drafter(pool: str, opts: ServeOptions, port: int = 0) -> tuple[Running, object]:
    from specfleet.drafter.service import DrafterService
    from specfleet.engine.factory import build_proposer

    kind = pool if pool in MODEL_FREE_POOLS else "model"
    names = () if kind != "model" else (pool,)
    proposer = build_proposer(kind, opts.models, names, opts.slots)  # on the serving thread: see Batcher
    vocab = 1 << 31
    if kind == "model":
        vocab = next(iter(proposer.drafters.values())).runner.vocab_size
    service = DrafterService(proposer, pool, capacity=opts.slots, vocab_size=vocab)
    running = await _start(opts, internal_pb2_grpc.add_DrafterServicer_to_server, service,
                           "specfleet.api.v1.Drafter", port)
    await _publish(opts, "drafter", running, service.snapshot, {"pool": pool})
    return running, service


async def start_fusion(opts: ServeOptions, port: int = 0) -> tuple[Running, object]:
    from specfleet.fusion.service import FusionService

    service = FusionService()
    running = await _start(opts, internal_pb2_grpc.add_FusionServicer_to_server, service, "specfleet.api.v1.Fusion",
                           port)
    await _publish(opts, "fusion", running, service.snapshot)
    return running, service


async def _store(opts: ServeOptions):
    from specfleet.state import StateStore, connect

    if not opts.redis_url:
        raise ValueError("the verifier and router need Redis: give --redis-url (or use `specfleet up`, which starts "
                         "an embedded one)")
    return StateStore(connect(opts.redis_url), prefix=opts.key_prefix)


async def start_verifier(opts: ServeOptions, port: int = 0) -> tuple[Running, object]:
    from specfleet.verifier.service import VerifierService

    target = _load(opts.models, "target")  # on the serving thread: see Batcher
    store = await _store(opts)
    cap = opts.max_batch_tokens
    if not cap and opts.profile is not None:
        from specfleet.profile import load, max_batch_tokens

        cap = max_batch_tokens(load(opts.profile), opts.max_batch_latency_ms)
        log.info("verifier: at most %d tokens per forward (profile %s, %.0f ms bound)", cap, opts.profile,
                 opts.max_batch_latency_ms)
    service = VerifierService(target, slots=opts.slots, store=store, max_batch_tokens=cap)
    running = await _start(opts, internal_pb2_grpc.add_VerifierServicer_to_server, service,
                           "specfleet.api.v1.Verifier", port)
    if opts.verify_stream:
        from specfleet.state.heartbeat import pod_name
        from specfleet.verifier.queue import VerifyConsumer

        consumer = opts.pod or pod_name("verifier", running.port)
        intake = max(1, min(opts.slots, opts.verify_intake))
        running.consumer = service.consumer = VerifyConsumer(service, store, consumer, capacity=intake).start()
    await _publish(opts, "verifier", running, service.snapshot, store=store)
    return running, service


async def start_router(opts: ServeOptions, config, port: int = 0, internal_token: str | None = None,
                       internal_tls: ChannelTls | None = None) -> tuple[Running, object]:
    """The public router; `internal_token` / `internal_tls` are what it presents to the internal services."""
    from transformers import AutoConfig, AutoTokenizer

    from specfleet.ratelimit import RateLimiter
    from specfleet.router.service import RouterService

    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(opts.models / "target"))
    model_cfg = AutoConfig.from_pretrained(str(opts.models / "target"))
    config.internal_token = internal_token
    if internal_tls is not None:
        config.internal_tls = internal_tls
    store = await _store(opts)
    service = RouterService(config, store, tokenizer, model_cfg.max_position_embeddings,
                            model_cfg.vocab_size, model_cfg.eos_token_id)
    running = await _start(opts, router_pb2_grpc.add_RouterServicer_to_server, service, "specfleet.api.v1.Router",
                           port, RateLimiter(opts.rate_limit_rps, opts.rate_limit_tpm))
    service.ensure_discovery()
    await _publish(opts, "router", running, service.snapshot, store=store)
    return running, service


@dataclass
class LocalFleet:
    """Every role in one process, on one event loop in a background thread: real gRPC servers on loopback."""

    opts: ServeOptions
    pools: tuple[str, ...] = DRAFTER_POOLS
    verifiers: int = 1
    fusion: bool = True
    k_max: int = 4
    adaptive: bool = True
    pipeline: bool = True
    routing: bool = True
    verify_queue: str = "stream"
    dsi: bool = True
    router_port: int = 0
    internal_token: str | None = None
    internal_tls: ServerTls | None = None  # the internal services' certificate (mTLS with a client CA)
    internal_client_tls: ChannelTls | None = None  # what the router presents to them
    servers: list[Running] = field(default_factory=list)
    services: dict[str, object] = field(default_factory=dict)
    retired: list[Running] = field(default_factory=list)
    router_address: str = ""

    def __post_init__(self):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="specfleet-fleet", daemon=True)

    def run(self, coro, timeout: float | None = None):
        """Runs a coroutine on the fleet's loop from another thread and waits for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> LocalFleet:
        self._thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        from specfleet.router.service import FleetConfig

        inner = self._internal_opts()
        drafters = {}
        for pool in self.pools:
            running, service = await start_drafter(pool, inner)
            self._keep(f"drafter-{pool}", running, service)
            drafters[pool] = f"127.0.0.1:{running.port}"
        verifiers = []
        for i in range(self.verifiers):
            running, service = await start_verifier(inner)
            self._keep(f"verifier-{i}", running, service)
            verifiers.append(f"127.0.0.1:{running.port}")
        fusion = None
        if self.fusion and len(self.pools) > 1:
            running, service = await start_fusion(inner)
            self._keep("fusion", running, service)
            fusion = f"127.0.0.1:{running.port}"
        config = FleetConfig(drafters=drafters, verifiers=verifiers, fusion=fusion, k_max=self.k_max,
                             adaptive=self.adaptive, pipeline=self.pipeline, routing=self.routing,
                             verify_queue=self.verify_queue, dsi=self.dsi)
        running, service = await start_router(self.opts, config, self.router_port, self.internal_token,
                                              self.internal_client_tls)
        self._keep("router", running, service)
        self.router_address = f"127.0.0.1:{running.port}"

    def _internal_opts(self) -> ServeOptions:
        """The internal services' options: as the router's, but they accept only the internal token (and, with
        internal_tls, only TLS callers)."""
        return dataclasses.replace(self.opts, token=self.internal_token, tls=self.internal_tls)

    def stop_role(self, name: str, grace: float = 0.5) -> int:
        """Stops one service (e.g. "drafter-python"); returns its port. Its server object is kept: dropping a
        stopped grpc.aio server lets its finaliser close a descriptor number a new server may already reuse."""
        index = list(self.services).index(name)
        running = self.servers[index]
        self.run(running.stop(grace))
        self.retired.append(running)
        return running.port

    def restart_drafter(self, pool: str) -> None:
        """Stops the drafter pool's server and starts a fresh one (empty caches) on the same port."""
        name = f"drafter-{pool}"
        port = self.stop_role(name)
        inner = self._internal_opts()
        running, service = self.run(start_drafter(pool, inner, port=port))
        index = list(self.services).index(name)
        self.servers[index], self.services[name] = running, service

    def _keep(self, name: str, running: Running, service) -> None:
        self.servers.append(running)
        self.services[name] = service

    def stop(self, grace: float = 2.0) -> None:
        async def stop_all():
            router = self.services.get("router")
            for running in reversed(self.servers):
                await running.stop(grace)
            if router is not None:
                await router.close()
            for task in asyncio.all_tasks():  # batchers' loops
                if task is not asyncio.current_task():
                    task.cancel()

        try:
            self.run(stop_all(), timeout=grace + 30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> LocalFleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
