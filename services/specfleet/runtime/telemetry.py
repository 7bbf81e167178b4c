"""OpenTelemetry traces across the fleet: one switch (`configure_tracing`), a span per RPC on every gRPC server,
client spans on the router's internal channels, a span per request at the OpenAI-compatible HTTP front, and the
W3C trace context (`traceparent`, `tracestate`) carried in gRPC metadata and HTTP headers.

Off unless an exporter is configured: then no interceptor or middleware is installed at all, so the per-round path
pays nothing; the SDK only looks up the caller's current span (one context read) to pass its trace on. Spans never
carry metadata, prompts or text: only ids and counts (request id, round, tree size, accepted, batch size)."""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import threading
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("specfleet.telemetry")

PROPAGATOR = TraceContextTextMapPropagator()
TRACE_HEADERS = frozenset(PROPAGATOR.fields)  # {"traceparent", "tracestate"}
OTLP_PACKAGE = "opentelemetry-exporter-otlp-proto-grpc==1.45.2"
HTTP_UNTRACED_PATHS = ("/health", "/metrics")  # probes and scrapes: frequent and uninteresting
STOP_FLUSH_S = 2.0  # at stop, buffered spans get this long to reach the collector (a healthy one takes ms)

_provider = None  # opentelemetry.sdk.trace.TracerProvider while tracing is on
_otlp = None  # its OTLP exporter, if any (aborted at stop when the collector does not answer in time)
_exit_hook = False
_tracer: trace.Tracer | None = None  # None: tracing off (nothing is installed, nothing is recorded)


# ---------------------------------------------------------------- configuration

def configure_tracing(service_name: str, otlp_endpoint: str | None = None, console: bool = False, *,
                      exporter=None) -> bool:
    """Turns tracing on for this process's specfleet services, or leaves it off; returns whether it is on.

    `otlp_endpoint` (e.g. http://collector:4317; http:// means plaintext) exports in batches over OTLP/gRPC,
    `console` prints each span to stdout, `exporter` is any SDK SpanExporter (tests use an in-memory one). With
    none of them tracing stays off. Call it before starting servers and channels: they install their
    interceptors when made. A second call replaces the first configuration (its spans are flushed first).
    The process's global tracer provider is left alone, so an application embedding specfleet keeps its own."""
    global _provider, _tracer, _otlp, _exit_hook
    shutdown_tracing()
    if not (otlp_endpoint or console or exporter is not None):
        return False  # before importing the SDK: an untraced process never loads it
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    processors, targets = [], []
    otlp = _otlp_exporter(otlp_endpoint) if otlp_endpoint else None
    if otlp is not None:
        processors.append(BatchSpanProcessor(otlp))  # exports off the serving thread, drops when a collector lags
        targets.append(f"OTLP {_without_credentials(otlp_endpoint)}")
    if console:
        processors.append(SimpleSpanProcessor(ConsoleSpanExporter(service_name=service_name)))
        targets.append("console")
    if exporter is not None:
        processors.append(SimpleSpanProcessor(exporter))
        targets.append(type(exporter).__name__)
    if not processors:
        return False
    attributes = {"service.name": service_name, "service.namespace": "specfleet"}
    if os.environ.get("SPECFLEET_POD_NAME"):
        attributes["service.instance.id"] = os.environ["SPECFLEET_POD_NAME"]
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)  # ours is bounded
    for processor in processors:
        provider.add_span_processor(processor)
    _provider, _tracer, _otlp = provider, provider.get_tracer("specfleet"), otlp
    if not _exit_hook:
        atexit.register(shutdown_tracing)
        _exit_hook = True
    log.info("tracing on as %s, exporting to %s", service_name, ", ".join(targets))
    return True


def _otlp_exporter(endpoint: str):
    """The OTLP/gRPC span exporter, or None (with a warning) where its optional package is missing: a fleet whose
    image lacks it keeps serving, untraced, rather than failing to start over telemetry."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("tracing is off: --otlp-endpoint / OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is "
                    "not installed; run `pip install %s`", OTLP_PACKAGE)
        return None
    return OTLPSpanExporter(endpoint=endpoint)


def _without_credentials(url: str) -> str:
    """The endpoint as it may be logged: any user:password@ part removed."""
    parts = urlsplit(url if "//" in url else f"//{url}")
    if parts.username or parts.password:
        host = parts.hostname or ""
        parts = parts._replace(netloc=f"***@{host}" + (f":{parts.port}" if parts.port else ""))
    return urlunsplit(parts).removeprefix("//")


def shutdown_tracing(flush_s: float = STOP_FLUSH_S) -> None:
    """Exports what is still buffered (for at most `flush_s`) and turns tracing off; servers and channels made
    later install nothing. Bounded because the OTLP exporter retries an absent collector for its whole timeout
    (10 s), which would hold up a stopping service."""
    global _provider, _tracer, _otlp
    provider, otlp, _provider, _tracer, _otlp = _provider, _otlp, None, None, None
    if provider is None:
        return
    stopping = threading.Thread(target=provider.shutdown, name="specfleet-trace-flush", daemon=True)
    stopping.start()
    stopping.join(flush_s)
    if stopping.is_alive() and otlp is not None:
        log.warning("the trace collector did not take the last spans within %.0fs; dropping them", flush_s)
        otlp.shutdown()  # cuts the exporter's retry wait short
        stopping.join(flush_s)


def tracing_enabled() -> bool:
    return _tracer is not None


def tracer() -> trace.Tracer:
    """specfleet's tracer: the configured one, else the API's no-op tracer."""
    return _tracer or trace.get_tracer("specfleet")


# ---------------------------------------------------------------- context propagation

def with_trace_context(metadata: Sequence[tuple[str, str]] = (), context=None) -> tuple[tuple[str, str], ...]:
    """`metadata` plus the W3C trace context of `context` (default: the current one) when a span is active there;
    `metadata` itself otherwise. Works with any tracer provider the caller uses, none included."""
    if not trace.get_current_span(context).get_span_context().is_valid:
        return metadata  # type: ignore[return-value]
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=context)
    return (*metadata, *carrier.items())


def _parent_from(pairs) -> otel_context.Context:
    """The remote parent named by traceparent / tracestate pairs; an empty context (the span is a root) if none."""
    carrier = {}
    for key, value in pairs or ():
        key = key.decode("latin-1") if isinstance(key, bytes) else key
        if key.lower() in TRACE_HEADERS:
            carrier[key.lower()] = value.decode("latin-1") if isinstance(value, bytes) else value
    return PROPAGATOR.extract(carrier) if carrier else otel_context.Context()


# ---------------------------------------------------------------- span names and attributes

def span_name(method: str) -> str:
    """`/specfleet.api.v1.Drafter/Draft` -> `specfleet.drafter/Draft` (other services keep their full name)."""
    service, _, name = method.lstrip("/").partition("/")
    if service.startswith("specfleet.api.v1."):
        service = "specfleet." + service.rsplit(".", 1)[1].lower()
    return f"{service}/{name}"


def _rpc_attributes(method: str) -> dict:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _tree_size(tree) -> int:
    return len(tree.tokens)


# Cheap attributes per message type (ids and counts only: never metadata, prompts or text).
_REQUEST_ATTRIBUTES = {
    "GenerateRequest": lambda m: {"specfleet.request_id": m.request_id, "specfleet.max_new_tokens": m.max_new_tokens},
    "DraftRequest": lambda m: {"specfleet.batch_size": len(m.items),
                               **({"specfleet.request_id": m.items[0].request_id, "specfleet.k": m.items[0].k}
                                  if len(m.items) == 1 else {})},
    "FuseRequest": lambda m: {"specfleet.request_id": m.request_id, "specfleet.drafts": len(m.drafts)},
    "VerifyRequest": lambda m: {"specfleet.request_id": m.request_id, "specfleet.round": m.round,
                                "specfleet.tree_size": _tree_size(m.tree)},
    "ReleaseRequest": lambda m: {"specfleet.request_id": m.request_id},
}
_RESPONSE_ATTRIBUTES = {
    "DraftResponse": lambda m: {"specfleet.tree_size": sum(_tree_size(t) for t in m.trees)},
    "FuseResponse": lambda m: {"specfleet.tree_size": _tree_size(m.tree)},
    "VerifyResponse": lambda m: {"specfleet.accepted": m.accepted, "specfleet.tokens": len(m.token_ids),
                                 "specfleet.batch_size": m.batch, "specfleet.replayed": m.replayed,
                                 "specfleet.finished": m.finished},
    "GenerateResponse": lambda m: {"specfleet.rounds": m.usage.rounds,
                                   "specfleet.completion_tokens": m.usage.completion_tokens,
                                   "specfleet.accepted": m.usage.accepted_tokens,
                                   "specfleet.finish_reason": m.finish_reason},
}


def _message_attributes(table: dict, message) -> dict:
    describe = table.get(type(message).__name__)
    return describe(message) if describe is not None else {}


def _record_status(span, code: grpc.StatusCode | None, exc: BaseException | None = None) -> None:
    if exc is not None and not isinstance(exc, grpc.aio.AbortError):  # an abort is a status, not a crash
        span.record_exception(exc)
    if code is None and exc is not None:  # CancelledError, GeneratorExit: the caller went away
        code = grpc.StatusCode.UNKNOWN if isinstance(exc, Exception) else grpc.StatusCode.CANCELLED
    code = code or grpc.StatusCode.OK
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))


def _context_code(context) -> grpc.StatusCode | None:
    try:
        return context.code()
    except Exception:  # noqa: BLE001  (an experimental API; the status is only informative here)
        return None


# ---------------------------------------------------------------- gRPC servers

def server_interceptors(skip: Sequence[str] = ()) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a server installs: the tracing one while tracing is on, none otherwise. Methods starting
    with a prefix in `skip` (health checks, reflection) get no span."""
    return [TracingServerInterceptor(tuple(skip))] if _tracer is not None else []


class TracingServerInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span per RPC named `specfleet.<role>/<Method>`, child of the caller's span when its metadata
    carries a traceparent, current while the servicer runs (so the calls it makes carry the trace on)."""

    def __init__(self, skip: tuple[str, ...] = ()):
        self._skip = skip

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        tracer_ = _tracer
        if handler is None or tracer_ is None or details.method.startswith(self._skip):
            return handler
        parent = _parent_from(details.invocation_metadata)
        name, attributes = span_name(details.method), _rpc_attributes(details.method)

        def start(request):
            span = tracer_.start_span(name, context=parent, kind=SpanKind.SERVER,
                                      attributes={**attributes, **_message_attributes(_REQUEST_ATTRIBUTES, request)})
            return span, trace.set_span_in_context(span, parent)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                span, ctx = start(request)
                token = otel_context.attach(ctx)
                failure = None
                try:
                    response = inner(request, context)
                    if inspect.isawaitable(response):
                        response = await response
                    span.set_attributes(_message_attributes(_RESPONSE_ATTRIBUTES, response))
                    return response
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    otel_context.detach(token)
                    _record_status(span, _context_code(context), failure)
                    span.end()

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                span, ctx = start(request)
                failure, last = None, None
                # the context is attached only while the servicer runs (between our awaits), never across a
                # yield: a generator closed from another task would otherwise detach in a foreign context
                token = otel_context.attach(ctx)
                try:
                    messages = inner_stream(request, context)
                finally:
                    otel_context.detach(token)
                try:
                    if not hasattr(messages, "__anext__"):  # a servicer that writes with context.write()
                        token = otel_context.attach(ctx)
                        try:
                            await messages
                        finally:
                            otel_context.detach(token)
                        return
                    while True:
                        token = otel_context.attach(ctx)
                        try:
                            message = await messages.__anext__()
                        except StopAsyncIteration:
                            break
                        finally:
                            otel_context.detach(token)
                        last = message
                        yield message
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    if hasattr(messages, "aclose"):
                        await messages.aclose()
                    if last is not None:
                        span.set_attributes(_message_attributes(_RESPONSE_ATTRIBUTES, last))
                    _record_status(span, _context_code(context), failure)
                    span.end()

            return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return handler  # client-streaming RPCs: none in specfleet; left untraced


# ---------------------------------------------------------------- gRPC clients

def client_interceptors(peer: str = "") -> list[grpc.aio.ClientInterceptor]:
    """The interceptors an internal grpc.aio channel to `peer` installs: the tracing one while tracing is on,
    none otherwise (a channel without interceptors takes gRPC's direct path)."""
    return [TracingClientInterceptor(peer)] if _tracer is not None else []


class TracingClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """A CLIENT span per unary call, child of the caller's current span; its traceparent travels in the metadata
    so the server's span is its child."""

    def __init__(self, peer: str = ""):
        self._peer = peer

    async def intercept_unary_unary(self, continuation, details, request):
        tracer_ = _tracer
        if tracer_ is None:
            return await continuation(details, request)
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        attributes = {**_rpc_attributes(method), **_message_attributes(_REQUEST_ATTRIBUTES, request)}
        if self._peer:
            attributes["server.address"] = self._peer
        span = tracer_.start_span(span_name(method), kind=SpanKind.CLIENT, attributes=attributes)
        metadata = with_trace_context(tuple(details.metadata or ()), trace.set_span_in_context(span))
        failure, code = None, None
        try:
            call = await continuation(details._replace(metadata=grpc.aio.Metadata(*metadata)), request)
            try:
                response = await call
                span.set_attributes(_message_attributes(_RESPONSE_ATTRIBUTES, response))
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:  # the caller gets the error from the call itself
                code = exc.code()
            return call
        except BaseException as exc:
            failure = exc
            raise
        finally:
            _record_status(span, code, failure)
            span.end()


# ---------------------------------------------------------------- work through Redis streams

VERIFY_SPAN = "specfleet.verifier/Verify"  # the same name whether a round travels by gRPC or by the stream


class QueueSpan:
    """A PRODUCER span around one job put on a Redis stream (and the wait for its reply), or the CONSUMER span of
    the verifier that does it, child of the producer through the job's trace fields. No-op while tracing is off."""

    def __init__(self, kind: SpanKind, destination: str, request, parent_fields=None):
        self.span = None
        tracer_ = _tracer
        if tracer_ is None:
            return
        attributes = {"messaging.system": "redis", "messaging.destination.name": destination,
                      "messaging.operation": "publish" if kind == SpanKind.PRODUCER else "process",
                      **_message_attributes(_REQUEST_ATTRIBUTES, request)}
        parent = _parent_from(parent_fields.items()) if parent_fields is not None else None
        self.span = tracer_.start_span(VERIFY_SPAN, context=parent, kind=kind, attributes=attributes)

    def fields(self) -> dict[str, str]:
        """The W3C trace context to carry in the job (empty while tracing is off)."""
        if self.span is None:
            return {}
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self.span))
        return carrier

    def end(self, response=None, code: grpc.StatusCode | None = None, exc: BaseException | None = None) -> None:
        if self.span is None:
            return
        if response is not None:
            self.span.set_attributes(_message_attributes(_RESPONSE_ATTRIBUTES, response))
        _record_status(self.span, code, exc)
        self.span.end()


# ---------------------------------------------------------------- HTTP front

class HttpTracing:
    """ASGI middleware: a SERVER span per HTTP request (`specfleet.http/POST /v1/completions`), child of the
    caller's `traceparent` header when present, current while the app runs (the router call it makes carries it
    on) and ended when the response, streamed or not, is complete. Add it only while tracing is on."""

    def __init__(self, app, skip_paths: Sequence[str] = HTTP_UNTRACED_PATHS):
        self.app, self._skip = app, tuple(skip_paths)

    async def __call__(self, scope, receive, send):
        tracer_ = _tracer
        if tracer_ is None or scope["type"] != "http" or scope["path"] in self._skip:
            return await self.app(scope, receive, send)
        parent = _parent_from(scope.get("headers"))
        path = scope["path"]
        route = "/v1/models/{model}" if path.startswith("/v1/models/") else path  # bounded span names
        span = tracer_.start_span(f"specfleet.http/{scope['method']} {route}", context=parent, kind=SpanKind.SERVER,
                                  attributes={"http.request.method": scope["method"], "url.path": path})

        async def send_traced(message):
            if message["type"] == "http.response.start":
                span.set_attribute("http.response.status_code", message["status"])
                if message["status"] >= 500:
                    span.set_status(Status(StatusCode.ERROR, f"HTTP {message['status']}"))
            await send(message)

        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            await self.app(scope, receive, send_traced)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            otel_context.detach(token)
            span.end()
