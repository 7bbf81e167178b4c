"""What every specfleet gRPC server shares: loopback-by-default binding, the standard health and reflection
services, bearer-token auth (constant-time), TLS / mTLS, per-caller rate limits, message size limits, a
micro-batcher that runs model work off the event loop, and graceful shutdown (readiness flips to NOT_SERVING
first, in-flight calls get a grace period)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from specfleet.runtime.ratelimit import RateLimit, RateLimiter
from specfleet.runtime.security import ChannelTls, ServerTls
from specfleet.runtime.telemetry import server_interceptors

log = logging.getLogger("specfleet")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# gRPC's reconnect backoff grows to two minutes while a peer is down or still starting; internal channels keep it
# at most a second, so a restarted peer (or one slow to start on a loaded machine) is used within a second
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                  ("grpc.max_reconnect_backoff_ms", 1000)]
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # reachable without a token (probes, tooling)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata on every call but health checks and reflection; several
    tokens may be accepted (one per caller, each with its own rate limit). Every token is compared in constant time,
    all of them on every call, so timing tells nothing about which one (or how much of one) matched."""

    def __init__(self, tokens: str | Sequence[str]):
        tokens = (tokens,) if isinstance(tokens, str) else tuple(tokens)
        if not tokens or not all(tokens):
            raise ValueError("BearerAuth needs at least one non-empty token")
        self._expected = [f"Bearer {token}".encode() for token in tokens]

    def accepts(self, given: str) -> bool:
        matched = False
        for expected in self._expected:
            matched |= hmac.compare_digest(given.encode(), expected)
        return matched

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if self.accepts(given):
            return await continuation(details)
        handler = await continuation(details)

        async def deny_unary(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'")

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'")
            yield  # pragma: no cover  (makes this an async generator)

        if handler is None:
            return None
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny_unary, handler.request_deserializer,
                                                   handler.response_serializer)


class _Malformed:
    """Stands in for a request whose bytes did not parse; the guarded handler answers it INVALID_ARGUMENT."""

    def __init__(self, message: str):
        self.message = message


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Answers a request whose bytes do not parse as the method's message (corrupt wire format, bad UTF-8 in a string
    field) with INVALID_ARGUMENT saying so; gRPC itself would answer UNKNOWN with a parser traceback."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, details.method

        def tolerant(data: bytes):
            try:
                return parse(data)
            except Exception as exc:  # noqa: BLE001  (protobuf's DecodeError, or anything a parser raises)
                return _Malformed(f"the request bytes are not a valid message for {method} ({exc}); build the "
                                  "request from the published .proto (protos/specfleet/api/v1/)")

        if handler.response_streaming:
            stream = handler.unary_stream

            async def guarded_stream(request, context):
                if isinstance(request, _Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                async for message in stream(request, context):
                    yield message

            return grpc.unary_stream_rpc_method_handler(guarded_stream, tolerant, handler.response_serializer)
        unary = handler.unary_unary

        async def guarded(request, context):
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(guarded, tolerant, handler.response_serializer)


@dataclass
class Running:
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    service_names: tuple[str, ...] = ()
    publisher: object | None = None  # state.heartbeat.HeartbeatPublisher, when the service reports to Redis
    consumer: object | None = None  # verifier.queue.VerifyConsumer: work taken from a Redis stream
    health_server: grpc.aio.Server | None = None  # plaintext, health only (kubelet probes of an mTLS service)
    health_port: int | None = None
    # the router's handover (RouterService.start_handover / stop_handover): called with the grace when the server
    # stops, and with the drain mark (True / False) as heartbeats read it
    on_stop: Callable[[float], None] | None = None
    on_drain_mark: Callable[[bool], None] | None = None

    async def set_serving(self, serving: bool) -> None:
        """Readiness of every service on this server (a draining pod answers NOT_SERVING, finishing what it has)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        """Readiness first (load balancers stop sending), then stop accepting, then wait for in-flight calls."""
        await self.health.enter_graceful_shutdown()
        if self.on_stop is not None:  # the router hands its live streams over to another replica within the grace
            self.on_stop(grace)
        if self.consumer is not None:  # takes no more stream jobs; finishes those in hand
            await self.consumer.stop(grace)
        if self.publisher is not None:
            await self.publisher.stop()
        await _bounded_stop(self.server, grace, f"the gRPC server on port {self.port}")
        if self.health_server is not None:  # last: probes see NOT_SERVING while in-flight calls finish
            await _bounded_stop(self.health_server, 0, f"the health server on port {self.health_port}")


# grpc.aio's server.stop(grace) cancels the calls still running at the end of the grace, but it can then wait for
# ever on a server-streaming call that was cancelled or aborted (grpc/grpc#28999, #37239): a stop is given this much
# beyond its grace, then the process goes on (a pod exits instead of hanging until Kubernetes kills it)
STOP_SLACK_S = 5.0


async def _bounded_stop(server: grpc.aio.Server, grace: float, what: str) -> None:
    stopping = asyncio.ensure_future(server.stop(grace))
    done, _ = await asyncio.wait({stopping}, timeout=grace + STOP_SLACK_S)
    if done:
        stopping.result()
        return
    log.warning("%s did not finish stopping within its %g s grace + %g s (grpc.aio can hang on a cancelled stream); "
                "going on without it", what, grace, STOP_SLACK_S)


async def _start_health_server(health: HealthServicer, address: str) -> tuple[grpc.aio.Server, int]:
    """A second, plaintext server answering only grpc.health.v1 from the main server's HealthServicer (the same
    statuses): kubelet's gRPC probes cannot present a client certificate, so an mTLS service is probed here. No
    other service, no reflection: nothing on this port reads or changes state."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4096)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"could not listen on {address} (--health-port)")
    await server.start()
    return server, bound


async def start_server(add: Sequence[tuple[Callable, object]], service_names: Sequence[str], host: str = "127.0.0.1",
                       port: int = 0, token: str | Sequence[str] | None = None,
                       tls: ServerTls | tuple[bytes, bytes] | None = None,
                       rate_limiter: RateLimiter | None = None, health_port: int | None = None) -> Running:
    """Starts a grpc.aio server with the given servicers plus health and reflection; port 0 picks a free port.
    `token`: one or several accepted bearer tokens; `tls`: a ServerTls (mTLS when it has a client CA) or
    (cert, key) PEM bytes; `rate_limiter`: per-caller limits on the router's generation calls; `health_port`: also
    answer health checks, and nothing else, in plaintext on host:health_port (0: any free port).
    With tracing on (specfleet.runtime.telemetry.configure_tracing, called before), every RPC but health and reflection
    gets a span; tracing comes first so that calls the token check refuses are traced too."""
    # rate limits after the token check (only valid callers use up buckets); innermost: malformed bytes are
    # answered INVALID_ARGUMENT only to callers that passed the token check
    interceptors = [*server_interceptors(skip=OPEN_METHODS), *([BearerAuth(token)] if token else []),
                    *([RateLimit(rate_limiter)] if rate_limiter is not None and rate_limiter.enabled else []),
                    MalformedRequests()]
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    for add_fn, servicer in add:
        add_fn(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    address = f"{host}:{port}"
    if isinstance(tls, tuple):
        tls = ServerTls(*tls)
    if tls:
        bound = server.add_secure_port(address, tls.credentials())
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"could not listen on {address}")
    await server.start()
    running = Running(server, bound, health, tuple(service_names))
    if health_port is not None:
        try:
            running.health_server, running.health_port = await _start_health_server(health, f"{host}:{health_port}")
        except OSError:
            await server.stop(0)
            raise
    await running.set_serving(True)
    return running


class RecentRequests:
    """The requests a service holds per-request state for (KV cache, suffix tree), least recently used first, so a
    full service evicts the coldest one; an evicted request's state is rebuilt from its context when it returns."""

    def __init__(self):
        self._order: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def touch(self, rids) -> None:
        for rid in rids:
            self._order[rid] = None
            self._order.move_to_end(rid)

    def forget(self, rid: str) -> None:
        self._order.pop(rid, None)

    def evict(self, full: Callable[[], bool], keep: set[str], release: Callable[[str], None]) -> None:
        """While full(), releases the least recently used request not in `keep`."""
        for rid in list(self._order):
            if not full():
                return
            if rid not in keep:
                del self._order[rid]
                release(rid)


class Batcher:
    """Collects concurrent calls into batches: a batch takes every call waiting when the worker is free (calls that
    arrive while a batch runs form the next one: continuous batching), plus, with max_wait_s > 0, calls arriving
    within that window; it closes early at `max_batch` items. One batch at a time. The window is held only while
    calls come together (the batch before held several): a lone caller's call runs at once, with no timer in its
    path.

    `run(items) -> results` runs on the event loop's own thread by default (`inline`): measured on these machines, a
    CPU forward ran 2.2x slower unless the weights were loaded and the forward run on the process's main thread,
    so a service loads its model and serves on its main thread; calls that arrive during a batch wait in the
    transport and form the next one. inline=False runs it on one dedicated worker thread instead."""

    def __init__(self, run: Callable[[list], list], max_batch: int, max_wait_s: float = 0.0, inline: bool = True,
                 weight: Callable[[object], int] | None = None, max_weight: int = 0):
        self._run, self.max_batch, self.max_wait_s, self.inline = run, max_batch, max_wait_s, inline
        # a token cap: a batch closes before its items' summed weight (e.g. tokens in one forward) passes max_weight;
        # the item that did not fit opens the next batch (a single item is never refused)
        self.weight, self.max_weight = weight, max_weight
        self._carry: tuple | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._executor = None if inline else ThreadPoolExecutor(max_workers=1, thread_name_prefix="specfleet-batch")
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.busy_s = 0.0
        self.wait_s = 0.0  # summed time items waited for their batch (heartbeats report the mean per interval)
        self.waited = 0
        self.recent_waits: deque[float] = deque(maxlen=512)
        self.running = 0  # items in the batch being run
        self._last_size = 0  # items in the last batch: the window is held only after one of several

    async def submit(self, item, waited_s: float = 0.0) -> object:
        """Runs `item` in a batch; `waited_s`: how long it already waited upstream (in a Redis stream), counted in
        the queue wait the heartbeats report (the autoscaler's signal)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        future.enqueued = time.perf_counter() - max(0.0, waited_s)
        await self._queue.put((item, future))
        return await future

    @property
    def depth(self) -> int:
        return self._queue.qsize() + (self._carry is not None)

    def snapshot(self) -> dict[str, float]:
        """Cumulative counters and gauges for heartbeats (see state.heartbeat.rates)."""
        waits = sorted(self.recent_waits)
        p99 = 1000 * waits[min(len(waits) - 1, int(0.99 * len(waits)))] if waits else 0.0
        return {"busy_s": self.busy_s, "steps": self.batches, "wait_s": self.wait_s, "waited": self.waited,
                "queue_depth": self.depth, "inflight": self.depth + self.running, "queue_wait_p99_ms": p99}

    async def _loop(self) -> None:
        while True:
            if self._carry is not None:
                batch, self._carry = [self._carry], None
            else:
                batch = [await self._queue.get()]
            capped = self.weight is not None and self.max_weight > 0
            total = self.weight(batch[0][0]) if capped else 0
            deadline = time.monotonic() + (self.max_wait_s if self._last_size > 1 else 0.0)
            while len(batch) < self.max_batch:
                timeout = deadline - time.monotonic()
                if timeout <= 0 and self._queue.empty():
                    break
                try:
                    entry = (await asyncio.wait_for(self._queue.get(), max(timeout, 0)) if timeout > 0
                             else self._queue.get_nowait())
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if capped:
                    total += self.weight(entry[0])
                    if total > self.max_weight:
                        self._carry = entry
                        break
                batch.append(entry)
            live = [(item, fut) for item, fut in batch if not fut.cancelled()]
            if not live:
                continue
            start = time.perf_counter()
            waits = [start - fut.enqueued for _, fut in live]
            self.wait_s += sum(waits)
            self.recent_waits.extend(waits)
            self.waited += len(live)
            self.running = self._last_size = len(live)
            try:
                items = [item for item, _ in live]
                if self.inline:
                    results = self._run(items)
                else:
                    results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, items)
            except Exception as exc:  # the callers get the error; the loop keeps serving
                log.exception("batch failed")
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            finally:
                self.busy_s += time.perf_counter() - start
                self.batches += 1
                self.running = 0
            for (_, fut), result in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(result)


async def wait_healthy(target: str, timeout: float = 60.0, service: str = "", tls: ChannelTls | None = None) -> None:
    """Waits until a server's health check answers SERVING (raises TimeoutError); `tls` for a TLS / mTLS server."""
    deadline = time.monotonic() + timeout
    channel = (grpc.aio.secure_channel(target, tls.credentials(), options=FAST_RECONNECT + tls.options()) if tls
               else grpc.aio.insecure_channel(target, options=FAST_RECONNECT))
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} did not become healthy within {timeout:.0f}s")
            await asyncio.sleep(0.1)

