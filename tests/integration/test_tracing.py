"""OpenTelemetry traces across the fleet over real gRPC on loopback and the real Redis: one Generate call gives spans
on the router, the drafter and the verifier in one trace, linked parent to child through gRPC metadata; the SDK
caller's span is the root; the HTTP front joins a caller's traceparent; no span carries a token; with tracing off
nothing is installed; spans reach an OTLP collector, and a missing collector costs the fleet nothing."""

import asyncio
import json
import threading
import time
import urllib.request
import uuid

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from specfleet.local.inprocess import LocalFleet
from specfleet.router.http import build_app, start_http_in_thread
from specfleet.runtime import telemetry
from specfleet.runtime.process import ServeOptions
from specfleet.sdk import AsyncClient, Client
from specfleet.state.embedded import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"
PUBLIC_TOKEN = "public-tok-7d1f0c"
INTERNAL_TOKEN = "internal-tok-93be2a"
PROMPT = "def parse_args(argv):\n    "
SERVER, CLIENT = trace.SpanKind.SERVER, trace.SpanKind.CLIENT
# rounds reach the verifiers through the Redis stream: the router's span is a PRODUCER, the verifier's a CONSUMER
PRODUCER, CONSUMER = trace.SpanKind.PRODUCER, trace.SpanKind.CONSUMER
SERVED = {"drafter": SERVER, "verifier": CONSUMER}
CALLED = {"drafter": CLIENT, "verifier": PRODUCER}


@pytest.fixture(scope="module")
def spans(models_dir):
    """Tracing on into memory for the module, then off again (servers made later install nothing)."""
    exporter = InMemorySpanExporter()
    assert telemetry.configure_tracing("specfleet-test", exporter=exporter)
    yield exporter
    telemetry.shutdown_tracing()


@pytest.fixture(scope="module")
def fleet(models_dir, spans):
    prefix = f"sftest-trace-{uuid.uuid4().hex[:8]}"
    opts = ServeOptions(models_dir, redis_url=REDIS_URL, key_prefix=prefix, slots=4, token=PUBLIC_TOKEN)
    with LocalFleet(opts, pools=("suffix",), adaptive=False, internal_token=INTERNAL_TOKEN) as running:
        yield running
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def _trace_of(exporter, trace_id: int, until, timeout: float = 10.0) -> list:
    """The trace's finished spans once `until(spans)` holds (server spans end just after their last message)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
        if until(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _named(found, name: str, kind) -> list:
    return [s for s in found if s.name == name and s.kind == kind]


def _complete_round_trips(found) -> bool:
    verifies = _named(found, "specfleet.verifier/Verify", CONSUMER)
    return bool(_named(found, "specfleet.router/Generate", SERVER)) and bool(verifies) and any(
        s.attributes.get("specfleet.finished") for s in verifies)


def _generate(address: str, max_new_tokens: int = 8) -> tuple[str, list]:
    rid = uuid.uuid4().hex
    with Client(address, token=PUBLIC_TOKEN, timeout=60) as client:
        chunks = list(client.generate(PROMPT, max_new_tokens=max_new_tokens, request_id=rid))
    assert chunks[-1].finished
    return rid, chunks


def test_tracing_off_installs_nothing():
    telemetry.shutdown_tracing()
    assert telemetry.configure_tracing("specfleet-off") is False  # no exporter: off, the SDK is never needed
    assert not telemetry.tracing_enabled()
    assert telemetry.server_interceptors(skip=("/grpc.health.v1.Health/",)) == []
    assert telemetry.client_interceptors("127.0.0.1:1") == []
    metadata = (("authorization", "Bearer x"),)
    assert telemetry.with_trace_context(metadata) is metadata  # no current span: nothing added, nothing copied
    with trace.get_tracer("caller").start_as_current_span("no-provider"):  # the API's default no-op tracer
        assert telemetry.with_trace_context(metadata) is metadata


def test_one_generate_is_one_trace_from_the_sdk_caller_through_router_drafter_and_verifier(fleet, spans):
    with telemetry.tracer().start_as_current_span("caller") as caller:
        rid, chunks = _generate(fleet.router_address)
    trace_id = caller.get_span_context().trace_id
    found = _trace_of(spans, trace_id, _complete_round_trips)

    (router,) = _named(found, "specfleet.router/Generate", SERVER)
    assert router.parent.span_id == caller.get_span_context().span_id  # the caller's span is the root
    assert router.parent.is_remote  # reached through gRPC metadata, not a shared in-process context
    assert router.attributes["specfleet.request_id"] == rid
    assert router.attributes["specfleet.rounds"] == chunks[-1].usage.rounds
    assert router.attributes["rpc.grpc.status_code"] == 0
    by_id = {s.context.span_id: s for s in found}

    for role, method in (("drafter", "Draft"), ("verifier", "Verify")):
        served = _named(found, f"specfleet.{role}/{method}", SERVED[role])
        assert served, f"no {role} spans in the trace"
        for span in served:
            client_span = by_id[span.parent.span_id]  # the router's client span for this very call
            assert span.parent.is_remote
            assert client_span.kind == CALLED[role] and client_span.name == span.name
            assert client_span.parent.span_id == router.context.span_id
            if role == "verifier":
                assert client_span.attributes["messaging.destination.name"] == "verify"
            else:
                assert client_span.attributes["server.address"].startswith("127.0.0.1:")
            assert span.attributes["specfleet.request_id"] == rid
    verifies = sorted(_named(found, "specfleet.verifier/Verify", CONSUMER),
                      key=lambda s: s.attributes["specfleet.round"])
    assert [s.attributes["specfleet.round"] for s in verifies] == list(range(chunks[-1].usage.rounds))
    for span in verifies:
        assert {"specfleet.tree_size", "specfleet.accepted", "specfleet.batch_size"} <= set(span.attributes)
        assert span.attributes["specfleet.batch_size"] >= 1
    assert sum(s.attributes["specfleet.accepted"] for s in verifies) == chunks[-1].usage.accepted_tokens
    drafts = _named(found, "specfleet.drafter/Draft", SERVER)
    assert all("specfleet.tree_size" in s.attributes and s.attributes["specfleet.k"] >= 1 for s in drafts)


def test_without_a_caller_span_the_router_span_is_the_root(fleet, spans):
    rid, _ = _generate(fleet.router_address, max_new_tokens=3)
    deadline = time.monotonic() + 10
    while True:
        routers = [s for s in spans.get_finished_spans()
                   if s.name == "specfleet.router/Generate" and s.attributes.get("specfleet.request_id") == rid]
        if routers or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    (router,) = routers
    assert router.parent is None
    found = _trace_of(spans, router.context.trace_id, _complete_round_trips)
    assert {s.name for s in found} >= {"specfleet.drafter/Draft", "specfleet.verifier/Verify"}


def test_the_async_client_passes_the_callers_trace_on(fleet, spans):
    async def call():
        with telemetry.tracer().start_as_current_span("async-caller") as caller:
            async with AsyncClient(fleet.router_address, token=PUBLIC_TOKEN, timeout=60) as client:
                await client.complete(PROMPT, max_new_tokens=2)
        return caller.get_span_context()

    caller = asyncio.run(call())
    found = _trace_of(spans, caller.trace_id, lambda f: bool(_named(f, "specfleet.router/Complete", SERVER)))
    (router,) = _named(found, "specfleet.router/Complete", SERVER)
    assert router.parent.span_id == caller.span_id


def test_a_refused_token_is_traced_as_unauthenticated(fleet, spans):
    with telemetry.tracer().start_as_current_span("caller") as caller:
        with Client(fleet.router_address, token="wrong-token", timeout=10, retries=0) as client:
            with pytest.raises(Exception, match="UNAUTHENTICATED"):
                client.complete(PROMPT, max_new_tokens=2)
    found = _trace_of(spans, caller.get_span_context().trace_id,
                      lambda f: bool(_named(f, "specfleet.router/Complete", SERVER)))
    (router,) = _named(found, "specfleet.router/Complete", SERVER)
    assert router.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert router.status.status_code == trace.StatusCode.ERROR


def test_the_http_front_joins_the_callers_trace_and_passes_it_to_the_router(fleet, spans):
    server, thread, port = start_http_in_thread(build_app(fleet.router_address, PUBLIC_TOKEN), "127.0.0.1", 0)
    try:
        with telemetry.tracer().start_as_current_span("http-caller") as caller:
            headers = dict(telemetry.with_trace_context((("Authorization", f"Bearer {PUBLIC_TOKEN}"),
                                                         ("Content-Type", "application/json"))))
            body = json.dumps({"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, headers)
            with urllib.request.urlopen(request, timeout=60) as response:
                assert b"[DONE]" in response.read()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    found = _trace_of(spans, caller.get_span_context().trace_id,
                      lambda f: bool(_named(f, "specfleet.http/POST /v1/completions", SERVER))
                      and _complete_round_trips(f))
    (http,) = _named(found, "specfleet.http/POST /v1/completions", SERVER)
    (router,) = _named(found, "specfleet.router/Generate", SERVER)
    assert http.parent.span_id == caller.get_span_context().span_id
    assert router.parent.span_id == http.context.span_id
    assert http.attributes["http.response.status_code"] == 200
    assert http.end_time >= router.end_time  # the HTTP span covers the whole streamed response


def test_no_span_carries_a_token(fleet, spans):
    finished = spans.get_finished_spans()
    assert len(finished) > 10  # the tests above ran (module order)
    secrets = (PUBLIC_TOKEN, INTERNAL_TOKEN, "wrong-token", "Bearer")
    for span in finished:
        text = json.dumps({"name": span.name, "attributes": dict(span.attributes),
                           "events": [(e.name, dict(e.attributes)) for e in span.events],
                           "resource": dict(span.resource.attributes)}, default=str)
        assert not any(secret in text for secret in secrets), span.name


# ---------------------------------------------------------------- OTLP export (optional package)

def test_spans_reach_an_otlp_collector_over_grpc():
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    from concurrent.futures import ThreadPoolExecutor

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received, arrived = [], threading.Event()

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(request)
            arrived.set()
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    try:
        assert telemetry.configure_tracing("specfleet-otlp-test", otlp_endpoint=f"http://127.0.0.1:{port}")
        with telemetry.tracer().start_as_current_span("exported", attributes={"specfleet.round": 3}):
            pass
        telemetry.shutdown_tracing()  # flushes the batch
        assert arrived.wait(10), "the collector received no spans"
    finally:
        telemetry.shutdown_tracing()
        collector.stop(0)
    resource_spans = received[0].resource_spans[0]
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
    assert service == "specfleet-otlp-test"
    assert [s.name for s in resource_spans.scope_spans[0].spans] == ["exported"]


def test_no_collector_listening_costs_the_caller_nothing():
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    try:
        assert telemetry.configure_tracing("specfleet-no-collector", otlp_endpoint=f"http://127.0.0.1:{free_port()}")
        with telemetry.tracer().start_as_current_span("dropped") as span:
            assert span.get_span_context().is_valid  # spans are made; the exporter retries off this thread
    finally:
        telemetry.shutdown_tracing(flush_s=0.3)  # returns: the exporter's retry wait is cut short
    assert not telemetry.tracing_enabled()


def test_an_endpoint_without_the_exporter_package_leaves_tracing_off_with_a_warning(monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)  # ImportError
    assert telemetry.configure_tracing("specfleet-no-exporter", otlp_endpoint="http://127.0.0.1:4317") is False
    assert not telemetry.tracing_enabled()
    assert telemetry.OTLP_PACKAGE in caplog.text


def test_a_logged_endpoint_has_no_credentials():
    assert telemetry._without_credentials("http://user:pw@collector:4317") == "http://***@collector:4317"
    assert telemetry._without_credentials("collector:4317") == "collector:4317"
