"""OpenAI-compatible HTTP front of the router: `POST /v1/completions` (plain and SSE streaming), `GET /v1/models`,
`GET /health`, Prometheus `GET /metrics` (vLLM-compatible speculative-decoding counters) and its OpenAPI description
`GET /openapi.json`. It talks to any router
over gRPC (`specfleet.api.v1.Router`), so it runs beside the router or in front of a remote one.

Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; router gRPC codes map to HTTP statuses
(INVALID_ARGUMENT 400, UNAUTHENTICATED 401, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504)."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import secrets
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
from specfleet.router.limits import INT32_MAX, INT64_MAX, MAX_BODY_BYTES, MAX_STOP
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


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=getattr(self, "headers", None))


def _from_grpc(exc: grpc.aio.AioRpcError) -> ApiError:
    status, type_ = _GRPC_TO_HTTP.get(exc.code(), (500, "internal_error"))
    message = exc.details() or exc.code().name
    if status >= 500 and status != 503 and status != 504:
        message = f"the router failed: {message}"
    error = ApiError(status, message, type_, code=exc.code().name.lower())
    # the router's rate limit (specfleet.runtime.ratelimit)
    retry = dict(exc.trailing_metadata() or ()).get("retry-after")
    if status == 429 and retry:
        error.headers = {"Retry-After": str(retry)}
    return error


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


def _check_int(body: dict, name: str, default, low: int | None = None, high: int = INT32_MAX) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", param=name)
    if low is not None and value < low:
        raise ApiError(400, f"{name} must be >= {low}, got {value}", param=name)
    if value > high:
        raise ApiError(400, f"{name} must be <= {high}, got {value}", param=name)
    return value


def _check_float(body: dict, name: str, default: float | None) -> float | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a finite number, got {value!r}", param=name)
    try:
        number = float(value)
    except OverflowError:  # a JSON integer with hundreds of digits
        number = math.inf
    if not math.isfinite(number):
        raise ApiError(400, f"{name} must be a finite number, got {str(value)[:40]}", param=name)
    return number


def _unsupported(body: dict, name: str, allowed, why: str) -> None:
    if name in body and body[name] not in allowed:
        raise ApiError(400, f"{name}={body[name]!r} is not supported: {why}", param=name)


class _Completion:
    """A validated completions request."""

    def __init__(self, body: dict, model_name: str):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model", model_name)
        if model != model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")
        self.model = model_name
        if "prompt" not in body or body["prompt"] is None:
            raise ApiError(400, "prompt is required: give a string (or a list of one string, or a list of token "
                                "ids)", param="prompt")
        prompt = body["prompt"]
        self.text, self.ids = "", []
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            self.text = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            if not all(0 <= t <= INT32_MAX for t in prompt):
                raise ApiError(400, "prompt token ids must be integers >= 0 (ids of the model's vocabulary)",
                               param="prompt")
            self.ids = prompt
        elif isinstance(prompt, list) and len(prompt) > 1:
            raise ApiError(400, f"batched prompts are not supported: got {len(prompt)} prompts; send one request "
                                "per prompt", param="prompt")
        else:
            raise ApiError(400, "prompt must be a non-empty string, a list of one string, or a list of token ids",
                           param="prompt")
        self.max_tokens = _check_int(body, "max_tokens", 16, low=1)
        temperature = _check_float(body, "temperature", 1.0)
        if temperature < 0:
            raise ApiError(400, f"temperature must be >= 0 (0 = greedy), got {temperature:g}", param="temperature")
        self.temperature = temperature
        top_p = _check_float(body, "top_p", 1.0)
        if not 0 < top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], got {top_p:g}", param="top_p")
        self.top_p = top_p
        self.top_k = _check_int(body, "top_k", 0, low=-1)  # vLLM extension; -1 / 0 = off
        self.top_k = max(self.top_k, 0)
        seed = _check_int(body, "seed", None, low=-INT64_MAX - 1, high=INT64_MAX)
        self.seed = seed if seed is not None else secrets.randbits(62)  # no seed: a fresh sampling stream
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP:
            raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP} strings", param="stop")
        self.stop = [s for s in stop if s]
        n = _check_int(body, "n", 1)
        if n != 1:
            raise ApiError(400, f"n must be 1 (one choice per request), got {n}; send {n} requests instead",
                           param="n")
        best_of = _check_int(body, "best_of", 1)
        if best_of != 1:
            raise ApiError(400, f"best_of must be 1, got {best_of}", param="best_of")
        _unsupported(body, "echo", (False, None), "echo must be false")
        _unsupported(body, "logprobs", (None, 0, False), "logprobs are not returned")
        _unsupported(body, "suffix", (None, ""), "suffix insertion is not supported")
        _unsupported(body, "logit_bias", (None, {}), "logit_bias would change the target's distribution")
        for name in ("presence_penalty", "frequency_penalty"):
            _unsupported(body, name, (None, 0, 0.0), "penalties would change the target's distribution")
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise ApiError(400, "stream must be true or false", param="stream")
        self.stream = bool(stream)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        self.include_usage = bool(options.get("include_usage", False))
        ignore_eos = body.get("ignore_eos", False)  # vLLM extension
        self.ignore_eos = bool(ignore_eos)

    def to_pb(self, request_id: str) -> router_pb2.GenerateRequest:
        return router_pb2.GenerateRequest(
            request_id=request_id, prompt=self.text, prompt_token_ids=self.ids, max_new_tokens=self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=self.stop,
            ignore_eos=self.ignore_eos)


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


def _usage_json(usage: router_pb2.Usage | None) -> dict:
    if usage is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def build_app(router_address: str, token: str | None = None, model_name: str = "specfleet-target", *,
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
        endpoint = path if path in ("/v1/completions", "/v1/models", "/health", "/metrics") else "other"
        start = time.perf_counter()
        if expected is not None and path != "/health":
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                response = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                    "authentication_error", code="invalid_api_key").response()
                metrics.requests.labels(endpoint, "401").inc()
                return response
        response = await call_next(request)
        if endpoint != "/v1/completions" or response.status_code != 200:  # a completion counts itself when done
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
            if endpoint != "/metrics":
                metrics.seconds.labels(endpoint).observe(time.perf_counter() - start)
        return response

    if tracing_enabled():  # outermost: its span covers auth, metrics and the whole (streamed) response
        app.add_middleware(HttpTracing)

    def _metadata(request: Request) -> tuple:
        if token:
            return with_trace_context((("authorization", f"Bearer {token}"),))
        given = request.headers.get("authorization")
        return with_trace_context((("authorization", given),) if given else ())  # the request's span, when traced

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

    @app.post("/v1/completions")
    async def completions(request: Request):
        start = time.perf_counter()
        raw = await _read_body(request, max_body_bytes)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        except RecursionError:  # json.loads recurses per nesting level
            raise ApiError(400, "the request body nests JSON too deeply; send a flat completions object") from None
        req = _Completion(body, model_name)
        rid = uuid.uuid4().hex
        cid, created = f"cmpl-{rid}", int(time.time())
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
            metrics.requests.labels("/v1/completions", status).inc()
            metrics.seconds.labels("/v1/completions").observe(time.perf_counter() - start)
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
            return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": "".join(texts), "finish_reason": last.finish_reason or None,
                                 "logprobs": None}],
                    "usage": _usage_json(last.usage)}

        def chunk(text: str, finish: str | None) -> str:
            data = {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
            if req.include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        async def sse():
            nonlocal prev
            status, last = "200", None
            try:
                async for message in messages():
                    metrics.observe_round(prev, message.usage)
                    prev, last = message.usage, message
                    if message.text or message.finished:
                        yield chunk(message.text, (message.finish_reason or "stop") if message.finished else None)
                if req.include_usage:
                    data = {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                            "choices": [], "usage": _usage_json(last.usage if last else None)}
                    yield f"data: {json.dumps(data)}\n\n"
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
