"""OpenAI-compatible HTTP front of the router: `POST /v1/completions` and `POST /v1/chat/completions` (plain and SSE
streaming; the bodies are checked in `bodies.py`), `GET /v1/models`,
`GET /health`, Prometheus `GET /metrics` (vLLM-compatible speculative-decoding counters) and its OpenAPI description
`GET /openapi.json`. It talks to any router
over gRPC (`specfleet.api.v1.Router`), so it runs beside the router or in front of a remote one.

Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; router gRPC codes map to HTTP statuses
(INVALID_ARGUMENT 400, UNAUTHENTICATED 401, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504)."""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from specfleet.api.v1 import router_pb2, router_pb2_grpc
from specfleet.router.bodies import ApiError, ChatCompletion, Completion
from specfleet.router.limits import HANDED_OVER, MAX_BODY_BYTES, NO_HANDOVER, SERVED_MODEL_NAME
from specfleet.runtime.server import FAST_RECONNECT
from specfleet.runtime.telemetry import HttpTracing, tracing_enabled, with_trace_context

_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def _from_grpc(exc: grpc.aio.AioRpcError) -> ApiError:
    status, type_ = _GRPC_TO_HTTP.get(exc.code(), (500, "internal_error"))
    message = exc.details() or exc.code().name
    if message.startswith(HANDED_OVER):  # an HTTP request has no request id to resume by: say what to do instead
        message = (f"{HANDED_OVER}: the router serving this request shut down before it finished (its grace period "
                   "ran out), and an OpenAI-compatible request cannot be resumed; send it again (with the same seed "
                   "for the same output)")
    if status >= 500 and status != 503 and status != 504:
        message = f"the router failed: {message}"
    error = ApiError(status, message, type_, code=exc.code().name.lower())
    # the router's rate limit (specfleet.runtime.ratelimit)
    retry = dict(exc.trailing_metadata() or ()).get("retry-after")
    if status == 429 and retry:
        error.headers = {"Retry-After": str(retry)}
    return error

_GENERATING = ("/v1/completions", "/v1/chat/completions")  # endpoints whose requests count themselves when done


class _Metrics:
    """Per-app registry (several apps may live in one process, e.g. in tests)."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r = self.registry
        self.drafts = Counter("spec_decode_num_drafts", "Speculative rounds that drafted tokens.", ["model_name"],
                              registry=r)
        self.draft_tokens = Counter("spec_decode_num_draft_tokens", "Draft tokens proposed.", ["model_name"],
                                    registry=r)
        self.accepted = Counter("spec_decode_num_accepted_tokens", "Draft tokens accepted by the target.",
                                ["model_name"], registry=r)
        self.per_pos = Counter("spec_decode_num_accepted_tokens_per_pos",
                               "Accepted draft tokens by position in the draft.", ["model_name", "position"],
                               registry=r)
        self.requests = Counter("specfleet_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.seconds = Histogram("specfleet_request_seconds", "HTTP request latency (whole stream for SSE).",
                                 ["endpoint"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.prompt_tokens = Counter("specfleet_prompt_tokens", "Prompt tokens of completed requests.",
                                     ["model_name"], registry=r)
        self.generation_tokens = Counter("specfleet_generation_tokens", "Tokens generated.", ["model_name"],
                                         registry=r)

    def observe_round(self, prev: router_pb2.Usage | None, usage: router_pb2.Usage) -> None:
        """Counts the speculation in one streamed message: the router sends one message per round, with usage so
        far; a resumed request's first message replays earlier rounds without draft counts (nothing is counted)."""
        rounds = usage.rounds - (prev.rounds if prev else 0)
        drafted = usage.draft_tokens - (prev.draft_tokens if prev else 0)
        accepted = usage.accepted_tokens - (prev.accepted_tokens if prev else 0)
        m = self.model_name
        if drafted > 0:
            self.drafts.labels(m).inc(rounds if rounds > 0 else 1)
            self.draft_tokens.labels(m).inc(drafted)
        if accepted > 0:
            self.accepted.labels(m).inc(accepted)
            if rounds == 1:  # one round: its accepted path covers draft positions 0 .. accepted-1
                for pos in range(accepted):
                    self.per_pos.labels(m, str(pos)).inc()


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {int(length)} bytes; the limit is {limit} bytes",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_unicode(body) -> None:
    """JSON may escape a lone UTF-16 surrogate (`"\\ud800"`): Python parses it into a str that no UTF-8 encoder (the
    tokenizer, protobuf) accepts. Such a body is refused here with a 400 rather than failing deep inside."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply; send a flat request object") from None
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"the request body has a string that is not valid Unicode ({exc.reason}: "
                            f"{exc.object[exc.start:exc.end]!r}); send text as UTF-8 without lone surrogate escapes"
                       ) from None


def _usage_json(usage: router_pb2.Usage | None) -> dict:
    if usage is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def build_app(router_address: str, token: str | None = None, model_name: str = SERVED_MODEL_NAME, *,
              timeout_s: float = 600.0, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The HTTP app in front of the router at `router_address`. With `token`, every endpoint but /health wants
    `Authorization: Bearer <token>` and the token is forwarded to the router as gRPC metadata; without one the
    caller's own Authorization header (if any) is passed through, so a router with its own token still decides."""
    state: dict[str, object] = {}
    metrics = _Metrics(model_name)
    expected = f"Bearer {token}".encode() if token else None
    created_at = int(time.time())

    def channel() -> grpc.aio.Channel:
        # made on first use, on the serving loop (a grpc.aio channel belongs to the loop it was made on)
        if "channel" not in state:
            options = [*FAST_RECONNECT, ("grpc.max_receive_message_length", 16 << 20)]
            state["channel"] = grpc.aio.insecure_channel(router_address, options=options)
        return state["channel"]  # type: ignore[return-value]

    async def lifespan(app):
        yield
        if "channel" in state:
            await state.pop("channel").close()  # type: ignore[union-attr]

    app = FastAPI(title="specfleet", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type_).response()

    @app.middleware("http")
    async def _auth_and_metrics(request: Request, call_next):
        path = request.url.path
        endpoint = path if path in (*_GENERATING, "/v1/models", "/health", "/metrics") else "other"
        start = time.perf_counter()
        if expected is not None and path != "/health":
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                response = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                    "authentication_error", code="invalid_api_key").response()
                metrics.requests.labels(endpoint, "401").inc()
                return response
        response = await call_next(request)
        if endpoint not in _GENERATING or response.status_code != 200:  # a completion counts itself when done
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
            if endpoint != "/metrics":
                metrics.seconds.labels(endpoint).observe(time.perf_counter() - start)
        return response

    if tracing_enabled():  # outermost: its span covers auth, metrics and the whole (streamed) response
        app.add_middleware(HttpTracing)

    def _metadata(request: Request) -> tuple:
        # NO_HANDOVER: an OpenAI client cannot resume a stream by request id, so a draining router lets this one run
        # on within its grace rather than handing it over
        if token:
            return with_trace_context((("authorization", f"Bearer {token}"), NO_HANDOVER))
        given = request.headers.get("authorization")
        return with_trace_context((("authorization", given), NO_HANDOVER) if given else (NO_HANDOVER,))

    @app.get("/health")
    async def health():
        try:
            reply = await health_pb2_grpc.HealthStub(channel()).Check(health_pb2.HealthCheckRequest(), timeout=2)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            detail = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            serving, detail = False, f"router unreachable: {exc.code().name}"
        return JSONResponse({"status": "ok" if serving else "unavailable", "router": detail},
                            status_code=200 if serving else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json")
    async def openapi():  # the API's description, checked in as docs/openapi.json (router/openapi.py builds it)
        from specfleet.router.openapi import openapi_spec

        return openapi_spec()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created_at,
                                            "owned_by": "specfleet"}]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return {"id": model_name, "object": "model", "created": created_at, "owned_by": "specfleet"}

    async def generate(request: Request, kind: type[Completion | ChatCompletion]):
        """One completion of either kind, plain or streamed: the router's Generate stream, shaped by `kind`."""
        endpoint = request.url.path
        start = time.perf_counter()
        raw = await _read_body(request, max_body_bytes)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        except RecursionError:  # json.loads recurses per nesting level
            raise ApiError(400, "the request body nests JSON too deeply; send a flat request object") from None
        _check_unicode(body)
        req = kind(body, model_name)
        rid = uuid.uuid4().hex
        cid, created = f"{req.ID_PREFIX}{rid}", int(time.time())
        call = router_pb2_grpc.RouterStub(channel()).Generate(req.to_pb(rid), timeout=timeout_s,
                                                               metadata=_metadata(request))
        prev: router_pb2.Usage | None = None
        try:
            first = await call.read()  # errors before any output become the HTTP status
        except grpc.aio.AioRpcError as exc:
            raise _from_grpc(exc) from None
        if first is grpc.aio.EOF:
            raise ApiError(502, "the router ended the stream without output", "internal_error")

        def done(status: str, usage: router_pb2.Usage | None) -> None:
            metrics.requests.labels(endpoint, status).inc()
            metrics.seconds.labels(endpoint).observe(time.perf_counter() - start)
            if usage is not None:
                metrics.prompt_tokens.labels(model_name).inc(usage.prompt_tokens)
                metrics.generation_tokens.labels(model_name).inc(usage.completion_tokens)

        async def messages():
            message = first
            while message is not grpc.aio.EOF:
                yield message
                message = await call.read()

        if not req.stream:
            texts, last = [], None
            try:
                async for message in messages():
                    metrics.observe_round(prev, message.usage)
                    prev = message.usage
                    texts.append(message.text)
                    last = message
            except grpc.aio.AioRpcError as exc:
                raise _from_grpc(exc) from None
            finally:
                call.cancel()
            done("200", last.usage)
            return {"id": cid, "object": req.OBJECT, "created": created, "model": model_name,
                    "choices": [req.choice("".join(texts), last.finish_reason or None)],
                    "usage": _usage_json(last.usage)}

        def event(choices: list[dict], usage: dict | None = None) -> str:
            data = {"id": cid, "object": req.CHUNK_OBJECT, "created": created, "model": model_name,
                    "choices": choices}
            if req.include_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        async def sse():
            nonlocal prev
            status, last, sent = "200", None, 0
            try:
                async for message in messages():
                    metrics.observe_round(prev, message.usage)
                    prev, last = message.usage, message
                    if message.text or message.finished:
                        finish = (message.finish_reason or "stop") if message.finished else None
                        yield event([req.chunk_choice(message.text, finish, first=sent == 0)])
                        sent += 1
                if req.include_usage:
                    yield event([], _usage_json(last.usage if last else None))
                yield "data: [DONE]\n\n"
            except grpc.aio.AioRpcError as exc:  # mid-stream: the status line is gone, say it in the stream
                error = _from_grpc(exc)
                status = str(error.status)
                yield f"data: {json.dumps(error.body())}\n\n"
            except asyncio.CancelledError:  # the client went away
                status = "499"
                raise
            finally:
                call.cancel()
                done(status, last.usage if last else None)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, Completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatCompletion)

    return app


# ---------------------------------------------------------------------------------------------------- serving


def build_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"):
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", access_log=False,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


async def serve_http(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, server=None) -> None:
    """Serves `app` on the running loop until `server.should_exit` is set (or SIGINT/SIGTERM in the main thread)."""
    server = server or build_server(app, host, port)
    await server.serve()


def bound_port(server) -> int:
    return server.servers[0].sockets[0].getsockname()[1]


def start_http_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                         timeout: float = 30.0) -> tuple[object, threading.Thread, int]:
    """Serves `app` on its own loop in a daemon thread; returns (server, thread, bound port) once it listens.
    Stop it with `server.should_exit = True; thread.join()`."""
    server = build_server(app, host, port)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(server.serve())
        except BaseException as exc:  # noqa: BLE001  (reported to the starting thread)
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"specfleet-http-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            reason = failure[0] if failure else "it did not start in time (is the port free?)"
            raise OSError(f"the HTTP server on {host}:{port} failed: {reason}")
        time.sleep(0.02)
    return server, thread, bound_port(server)
