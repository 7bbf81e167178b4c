"""What starting any service process takes: its options (`ServeOptions`), its gRPC server with the shared
interceptors, the Redis store it keeps state in and the heartbeat it publishes there. Each service's own `serve.py`
(`drafter/`, `fusion/`, `verifier/`, `router/`) builds on these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from specfleet.engine.llama import DEFAULT_KV_CACHE_MEMORY, KvLimits
from specfleet.engine.models import ModelSet
from specfleet.runtime.security import ServerTls
from specfleet.runtime.server import Running, start_server


@dataclass
class ServeOptions:
    models: Path | ModelSet  # a bundled-style folder, or the target and named drafters (engine/models.py)
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
    max_model_len: int | None = None  # positions (prompt + output) a request may use; default: the model's context
    kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY  # bytes of KV cache per verifier / drafter model

    def kv_limits(self) -> KvLimits:
        return KvLimits(self.max_model_len, self.kv_cache_memory)


async def start_service(opts: ServeOptions, add, servicer, name: str, port: int, rate_limiter=None) -> Running:
    """One servicer on a gRPC server with the options' address, tokens, TLS and health port."""
    return await start_server([(add, servicer)], [name], opts.host, port, opts.token, opts.tls, rate_limiter,
                              opts.health_port)


async def open_store(opts: ServeOptions):
    from specfleet.state import StateStore, connect

    if not opts.redis_url:
        raise ValueError("the verifier and router need Redis: give --redis-url (or use `specfleet up`, which starts "
                         "an embedded one)")
    return StateStore(connect(opts.redis_url), prefix=opts.key_prefix)


async def publish_heartbeat(opts: ServeOptions, role: str, running: Running, snapshot, extra: dict | None = None,
                            store=None) -> None:
    """Starts the service's heartbeat (load + NVML readings to Redis); a draining mark flips its health."""
    from specfleet.state.heartbeat import HeartbeatPublisher, advertised_address, pod_name

    if opts.heartbeat_s <= 0 or not (store or opts.redis_url):
        return
    store = store or await open_store(opts)
    pod = opts.pod or pod_name(role, running.port)

    async def on_drain(draining: bool) -> None:
        if running.consumer is not None:  # a draining verifier takes no more rounds from the stream
            running.consumer.pause(draining)
        await running.set_serving(not draining)
        if running.on_drain_mark is not None:  # marked draining by the operator, not merely cut off from Redis
            running.on_drain_mark(running.publisher.draining)

    running.publisher = HeartbeatPublisher(store, role, pod, advertised_address(opts.host, running.port), snapshot,
                                           on_drain, opts.heartbeat_s, extra).start()
