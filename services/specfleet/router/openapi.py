"""The OpenAPI 3.1 description of the router's HTTP front (`GET /openapi.json`, checked in as docs/openapi.json): the
completions and chat completions requests with the bounds the server really enforces (the HTTP layer's and the
router's), the responses each endpoint gives, and OpenAI's error shape for every 4xx / 5xx. Built from the same
constants the validation uses, so the two cannot drift; a test compares the served document with the checked-in
file."""

from __future__ import annotations

from typing import Any

from specfleet.router.limits import (
    INT32_MAX,
    INT64_MAX,
    MAX_BODY_BYTES,
    MAX_STOP,
    MAX_STOP_CHARS,
    MIN_TEMPERATURE,
)
from specfleet.runtime.chat import CHAT_ROLES


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _int(minimum: int, maximum: int, description: str, default: int | None = None) -> dict:
    schema: dict[str, Any] = {"type": "integer", "minimum": minimum, "maximum": maximum, "description": description}
    if default is not None:
        schema["default"] = default
    return schema


def _generating(operation: str, summary: str, name: str, what: str, unauthorized: dict) -> dict:
    """The operation of a generating endpoint: `{name}Request` in, `{name}` or a stream of `{name}Event` out."""
    return {
        "operationId": operation, "summary": summary,
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}Request"}}}},
        "responses": {
            "200": {"description": f"the {what}; with stream=true an event stream of {what} chunks",
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}},
                                "text/event-stream": {"schema": {"$ref": f"#/components/schemas/{name}Event"}}}},
            "400": _error("a field is out of range or of the wrong type, or the body is not valid JSON"),
            "401": unauthorized,
            "404": _error("unknown model (code model_not_found)"),
            "413": _error("the body is over the limit (code request_too_large)"),
            "429": _error("the fleet is at capacity or the caller over its rate limit; retry later"),
            "499": _error("the client cancelled"),
            "500": _error("the router failed"),
            "502": _error("the router ended the stream without output"),
            "503": _error("the router or a service behind it is unavailable; retry"),
            "504": _error("the router's deadline passed"),
        }}


def openapi_spec() -> dict[str, Any]:
    """The document; independent of the app's options (model name, token, body limit default)."""
    token_ids = {"type": "array", "minItems": 1, "items": _int(0, INT32_MAX, "a token id of the model's vocabulary"),
                 "description": "prompt token ids; ids outside the vocabulary are answered 400"}
    prompt = {"description": "the prompt: a non-empty string, a list of one string, a list of token ids or a list "
                             "of one list of token ids (batched prompts are refused: one request per prompt). The "
                             "prompt plus max_tokens must fit the model's context, else 400.",
              "oneOf": [{"type": "string", "minLength": 1},
                        {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string", "minLength": 1}},
                        token_ids,
                        {"type": "array", "minItems": 1, "maxItems": 1, "items": token_ids}]}
    stop_string = {"type": "string", "maxLength": MAX_STOP_CHARS}
    model_field = {"type": "string", "description": "the served model's id (GET /v1/models); any other is 404 "
                                                    "model_not_found. Default: the served model."}
    max_tokens = _int(1, INT32_MAX, "tokens to generate; with the prompt it must fit the model's context", 16)
    shared = {  # the sampling, stop and streaming fields both kinds of request take
        "temperature": {"type": "number", "anyOf": [{"const": 0}, {"minimum": MIN_TEMPERATURE}], "default": 1.0,
                        "description": f"0 = greedy, else at least {MIN_TEMPERATURE:g} (smaller positive values "
                                       "overflow float32); finite"},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0,
                  "description": "nucleus sampling mass"},
        "top_k": _int(-1, INT32_MAX, "sample among the k most likely tokens; 0 or -1 = off (vLLM extension)", 0),
        "seed": {"type": "integer", "minimum": -INT64_MAX - 1, "maximum": INT64_MAX,
                 "description": "equal seeds give equal samples; none: a fresh sampling stream"},
        "stop": {"description": f"up to {MAX_STOP} stop strings of at most {MAX_STOP_CHARS} characters",
                 "oneOf": [{"type": "null"}, stop_string,
                           {"type": "array", "maxItems": MAX_STOP, "items": stop_string}]},
        "stream": {"type": ["boolean", "null"], "default": False,
                   "description": "true: server-sent events, one chunk per round, then `data: [DONE]`"},
        "stream_options": {"type": ["object", "null"],
                           "properties": {"include_usage": {"type": "boolean", "default": False}}},
        "ignore_eos": {"type": "boolean", "default": False,
                       "description": "keep generating past end-of-text (vLLM extension)"},
        "n": {"const": 1, "description": "one choice per request"},
        "logprobs": {"enum": [None, 0, False], "description": "log probabilities are not returned"},
        "logit_bias": {"oneOf": [{"type": "null"}, {"type": "object", "maxProperties": 0}],
                       "description": "refused: it would change the target's distribution"},
        "presence_penalty": {"enum": [None, 0], "description": "refused: it would change the distribution"},
        "frequency_penalty": {"enum": [None, 0], "description": "refused: it would change the distribution"},
    }
    completion_request = {
        "type": "object", "required": ["prompt"],
        "description": f"OpenAI's completions request. Bodies over {MAX_BODY_BYTES} bytes (the default limit) are "
                       "answered 413; fields not listed here are ignored.",
        "properties": {
            "model": model_field,
            "prompt": prompt,
            "max_tokens": max_tokens,
            **shared,
            "best_of": {"const": 1},
            "echo": {"enum": [False, None]},
            "suffix": {"enum": [None, ""], "description": "suffix insertion is not supported"},
        },
    }
    message = {"type": "object", "required": ["role", "content"],
               "properties": {"role": {"enum": list(CHAT_ROLES)}, "content": {"type": "string"}}}
    chat_request = {
        "type": "object", "required": ["messages"],
        "description": "OpenAI's chat completions request: the conversation is rendered with the model's chat "
                       "template, ending in the assistant's turn (a model without a chat template answers 400). "
                       f"Bodies over {MAX_BODY_BYTES} bytes (the default limit) are answered 413; fields not listed "
                       "here are ignored.",
        "properties": {
            "model": model_field,
            "messages": {"type": "array", "minItems": 1, "items": message,
                         "description": "the conversation; text content only (no parts, images or tool calls)"},
            "max_completion_tokens": _int(1, INT32_MAX, "tokens to generate (wins over max_tokens); with the "
                                                        "rendered conversation it must fit the model's context"),
            "max_tokens": max_tokens,
            **shared,
            "top_logprobs": {"enum": [None, 0], "description": "log probabilities are not returned"},
            "tools": {"oneOf": [{"type": "null"}, {"type": "array", "maxItems": 0}],
                      "description": "function calling is not supported"},
            "tool_choice": {"enum": [None, "none"], "description": "function calling is not supported"},
            "response_format": {"oneOf": [{"type": "null"},
                                          {"type": "object", "required": ["type"], "additionalProperties": False,
                                           "properties": {"type": {"const": "text"}}}],
                                "description": "plain text only"},
        },
    }
    usage = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
             "properties": {k: {"type": "integer", "minimum": 0}
                            for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
    choice = {"type": "object", "required": ["index", "text", "finish_reason"],
              "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                             "finish_reason": {"type": ["string", "null"]}, "logprobs": {"type": "null"}}}
    completion = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                  "properties": {"id": {"type": "string"}, "object": {"const": "text_completion"},
                                 "created": {"type": "integer"}, "model": {"type": "string"},
                                 "choices": {"type": "array", "items": choice}, "usage": usage}}
    chat_choice = {"type": "object", "required": ["index", "message", "finish_reason"],
                   "properties": {"index": {"type": "integer"},
                                  "message": {"type": "object", "required": ["role", "content"],
                                              "properties": {"role": {"const": "assistant"},
                                                             "content": {"type": "string"}}},
                                  "finish_reason": {"type": ["string", "null"]}, "logprobs": {"type": "null"}}}
    chat_completion = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                       "properties": {"id": {"type": "string"}, "object": {"const": "chat.completion"},
                                      "created": {"type": "integer"}, "model": {"type": "string"},
                                      "choices": {"type": "array", "items": chat_choice}, "usage": usage}}
    chat_event = {"type": "object", "required": ["data"],
                  "description": "one server-sent event: a `chat.completion.chunk` whose one choice holds a `delta` "
                                 "(the first with role assistant, then the new content) and finish_reason on the "
                                 "last; with include_usage, usage is null until a last chunk with no choices; an "
                                 "error in OpenAI's shape when the stream fails midway, or `[DONE]`",
                  "properties": {"data": {"type": "string"}}}
    event = {"type": "object", "required": ["data"],
             "description": "one server-sent event: a completion chunk (a Completion whose choices hold the new text; "
                            "with include_usage, usage is null until a last chunk with no choices), an error in "
                            "OpenAI's shape when the stream fails midway, or `[DONE]`",
             "properties": {"data": {"type": "string"}}}
    model = {"type": "object", "required": ["id", "object", "created", "owned_by"],
             "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                            "owned_by": {"type": "string"}}}
    error = {"type": "object", "required": ["error"], "description": "OpenAI's error shape",
             "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"],
                                      "properties": {"message": {"type": "string", "minLength": 1},
                                                     "type": {"type": "string"},
                                                     "param": {"type": ["string", "null"]},
                                                     "code": {"type": ["string", "null"]}}}}}
    health = {"type": "object", "required": ["status", "router"],
              "properties": {"status": {"enum": ["ok", "unavailable"]},
                             "router": {"type": "string", "description": "the router's gRPC health, or why it "
                                                                         "could not be asked"}}}
    unauthorized = _error("missing or wrong API key (only when the server runs with a token)")
    return {
        "openapi": "3.1.0",
        "info": {"title": "specfleet", "version": "1",
                 "description": "OpenAI-compatible HTTP front of the specfleet router (speculative decoding, lossless "
                                "output). Errors use OpenAI's shape. With a token configured every endpoint but "
                                "/health wants `Authorization: Bearer <token>`."},
        "security": [{"bearer": []}, {}],
        "paths": {
            "/v1/completions": {"post": _generating("createCompletion", "complete a prompt (plain JSON or SSE "
                                                    "streaming)", "Completion", "completion", unauthorized)},
            "/v1/chat/completions": {"post": _generating("createChatCompletion", "answer a conversation (plain "
                                                         "JSON or SSE streaming)", "ChatCompletion",
                                                         "chat completion", unauthorized)},
            "/v1/models": {"get": {
                "operationId": "listModels", "summary": "the served model",
                "responses": {"200": {"description": "a list of one model", "content": {"application/json": {
                    "schema": {"type": "object", "required": ["object", "data"],
                               "properties": {"object": {"const": "list"},
                                              "data": {"type": "array", "items": {"$ref":
                                                                                  "#/components/schemas/Model"}}}}}}},
                              "401": unauthorized}}},
            "/v1/models/{model_id}": {"get": {
                "operationId": "retrieveModel", "summary": "one model by id",
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the model", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Model"}}}},
                              "401": unauthorized, "404": _error("unknown model (code model_not_found)")}}},
            "/health": {"get": {
                "operationId": "health", "summary": "readiness: 200 while the router answers SERVING", "security": [],
                "responses": {"200": {"description": "serving",
                                      "content": {"application/json": {"schema": {"$ref":
                                                                                  "#/components/schemas/Health"}}}},
                              "503": {"description": "the router is draining, cannot reach Redis, or is unreachable",
                                      "content": {"application/json": {"schema": {"$ref":
                                                                                  "#/components/schemas/Health"}}}}}}},
            "/metrics": {"get": {
                "operationId": "metrics", "summary": "Prometheus metrics (vLLM-compatible spec-decode counters)",
                "responses": {"200": {"description": "Prometheus text exposition format",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}},
                              "401": unauthorized}}},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "this document",
                "responses": {"200": {"description": "OpenAPI 3.1",
                                      "content": {"application/json": {"schema": {"type": "object"}}}},
                              "401": unauthorized}}},
        },
        "components": {
            "schemas": {"CompletionRequest": completion_request, "Completion": completion, "CompletionEvent": event,
                        "ChatCompletionRequest": chat_request, "ChatCompletion": chat_completion,
                        "ChatCompletionEvent": chat_event, "Model": model,
                        "Error": error, "Health": health},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
