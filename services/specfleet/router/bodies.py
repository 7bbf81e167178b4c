"""The HTTP front's request bodies, checked: OpenAI's completions and chat completions requests become the router's
GenerateRequest, and what cannot be served is refused with an `ApiError` in OpenAI's error shape saying what to fix.
Both kinds share one parser of the model, sampling, stop and streaming fields; each adds its input (a prompt, or
messages) and the shape of its choices (`text`, or a chat `message` / streamed `delta`)."""

from __future__ import annotations

import math
import secrets

from fastapi.responses import JSONResponse

from specfleet.api.v1 import router_pb2
from specfleet.router.limits import INT32_MAX, INT64_MAX, MAX_STOP
from specfleet.runtime.chat import check_messages


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


class _Generation:
    """What both request kinds share: the model, max tokens, sampling, stop strings, streaming. A subclass reads its
    input in `_read_input` and shapes its choices; the class attributes name its objects."""

    OBJECT = CHUNK_OBJECT = ID_PREFIX = ""

    def __init__(self, body: dict, model_name: str):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model", model_name)
        if model != model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")
        self.model = model_name
        self._read_input(body)
        self.max_tokens = _check_int(body, self._max_tokens_field(body), 16, low=1)
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
        _unsupported(body, "logprobs", (None, 0, False), "logprobs are not returned")
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

    def _read_input(self, body: dict) -> None:
        raise NotImplementedError

    def _max_tokens_field(self, body: dict) -> str:
        return "max_tokens"

    def _input_fields(self) -> dict:
        raise NotImplementedError

    def choice(self, text: str, finish: str | None) -> dict:
        """The one choice of a whole answer."""
        raise NotImplementedError

    def chunk_choice(self, text: str, finish: str | None, first: bool) -> dict:
        """The one choice of a streamed chunk; `first`: the stream's first chunk."""
        raise NotImplementedError

    def to_pb(self, request_id: str) -> router_pb2.GenerateRequest:
        return router_pb2.GenerateRequest(
            request_id=request_id, max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop=self.stop, ignore_eos=self.ignore_eos, **self._input_fields())


class Completion(_Generation):
    """`POST /v1/completions`: a prompt (text or token ids) to continue."""

    OBJECT = CHUNK_OBJECT = "text_completion"
    ID_PREFIX = "cmpl-"

    def _read_input(self, body: dict) -> None:
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
        best_of = _check_int(body, "best_of", 1)
        if best_of != 1:
            raise ApiError(400, f"best_of must be 1, got {best_of}", param="best_of")
        _unsupported(body, "echo", (False, None), "echo must be false")
        _unsupported(body, "suffix", (None, ""), "suffix insertion is not supported")

    def _input_fields(self) -> dict:
        return {"prompt": self.text, "prompt_token_ids": self.ids}

    def choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    def chunk_choice(self, text: str, finish: str | None, first: bool) -> dict:
        return self.choice(text, finish)


class ChatCompletion(_Generation):
    """`POST /v1/chat/completions`: a conversation, rendered by the router with the model's chat template."""

    OBJECT, CHUNK_OBJECT = "chat.completion", "chat.completion.chunk"
    ID_PREFIX = "chatcmpl-"

    def _read_input(self, body: dict) -> None:
        if body.get("messages") is None:
            raise ApiError(400, 'messages is required: give a list of {"role", "content"} objects', param="messages")
        try:
            self.messages = check_messages(body["messages"])
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        _unsupported(body, "tools", (None, []), "tools (function calling) are not supported")
        _unsupported(body, "tool_choice", (None, "none"), "tools (function calling) are not supported")
        _unsupported(body, "top_logprobs", (None, 0), "logprobs are not returned")
        response_format = body.get("response_format")
        if response_format is not None and response_format != {"type": "text"}:
            raise ApiError(400, f"response_format={response_format!r} is not supported: only plain text is "
                                "generated", param="response_format")

    def _max_tokens_field(self, body: dict) -> str:
        # OpenAI's newer name; the older max_tokens is still accepted
        return "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"

    def _input_fields(self) -> dict:
        return {"messages": [router_pb2.ChatMessage(**m) for m in self.messages]}

    def choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                "logprobs": None}

    def chunk_choice(self, text: str, finish: str | None, first: bool) -> dict:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
