"""The router's HTTP front describes itself (`GET /openapi.json`, checked in as docs/openapi.json), and schemathesis
fuzzes it from that description against a live fleet (real gRPC services, the real Redis): valid and invalid
requests of every operation, a bounded number each. No answer is a 5xx, every answer is one the document declares
(status, content type, body schema), and every 4xx carries OpenAI's error shape."""

import json
import uuid
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from specfleet.bench.fleet_bench import delete_prefix
from specfleet.local.inprocess import LocalFleet
from specfleet.router.http import build_app, start_http_in_thread
from specfleet.router.openapi import openapi_spec
from specfleet.runtime.process import ServeOptions

REDIS_URL = "redis://127.0.0.1:6379/0"
TOKEN = "openapi-test-token"
SPEC_FILE = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
EXAMPLES = 30  # per operation and mode in the fuzzing phase (the coverage phase adds its boundary cases)
# valid completions (of either kind) run real generations (a second each on a loaded 2-core machine): at most this
# many are sent, each cut to MAX_TOKENS tokens; invalid ones (answered before any model work) are all sent
VALID_COMPLETIONS = 30
MAX_TOKENS = 2
_sent = {"valid_completions": 0}

schema = schemathesis.openapi.from_dict(json.loads(SPEC_FILE.read_text()))


def test_served_document_equals_the_checked_in_file():
    server, thread, port = start_http_in_thread(build_app("127.0.0.1:1", token=TOKEN))  # no router needed
    try:
        reply = httpx.get(f"http://127.0.0.1:{port}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=10)
        assert reply.status_code == 200
        assert reply.json() == json.loads(SPEC_FILE.read_text()) == openapi_spec(), (
            "docs/openapi.json is stale: regenerate it with `python -c \"import json; from specfleet.router.openapi "
            "import openapi_spec; print(json.dumps(openapi_spec(), indent=2))\" > docs/openapi.json`")
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).status_code == 401  # behind the key
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def http_url(models_dir):
    prefix = f"sftest-openapi-{uuid.uuid4().hex[:8]}"
    opts = ServeOptions(models_dir, redis_url=REDIS_URL, key_prefix=prefix, slots=8, heartbeat_s=0)
    with LocalFleet(opts, pools=("suffix",), verifiers=1) as fleet:
        server, thread, port = start_http_in_thread(build_app(fleet.router_address, token=TOKEN, timeout_s=60))
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    delete_prefix(REDIS_URL, prefix)


def openai_error_shape(ctx, response, case):
    """Every 4xx / 5xx body is `{"error": {"message": non-empty str, "type": str, "param", "code"}}`."""
    if response.status_code < 400:
        return None
    body = json.loads(response.content)
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and "param" in error and "code" in error, body
    return True


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_declared_answers(case, http_url):
    generating = case.operation.path in ("/v1/completions", "/v1/chat/completions")
    if generating and case.meta is not None and case.meta.generation.mode.is_positive:
        if _sent["valid_completions"] >= VALID_COMPLETIONS:
            return
        _sent["valid_completions"] += 1
    body = case.body
    if isinstance(body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(field), int) and body[field] > 0:
                body[field] = min(body[field], MAX_TOKENS)
        if "max_tokens" not in body:
            body["max_tokens"] = MAX_TOKENS
        if isinstance(body.get("model"), str):  # a random model id is a 404 (tested on /v1/models/{id}): the served one
            body["model"] = "specfleet-target"
    response = case.call(base_url=http_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                             response_schema_conformance, openai_error_shape])
