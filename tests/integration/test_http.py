"""The OpenAI-compatible HTTP front over a real fleet (real gRPC on loopback, the real Redis): the official `openai`
client gets the target's own greedy text (plain and streamed), models / health / metrics, OpenAI-shaped errors with
the right statuses, and bearer auth (checked by the HTTP layer, and forwarded to a router that wants a token)."""

import json
import uuid

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from specfleet.local.inprocess import LocalFleet
from specfleet.router.http import build_app, start_http_in_thread
from specfleet.runtime.process import ServeOptions

REDIS_URL = "redis://127.0.0.1:6379/0"
TOKEN = "s3cret-token"
MODEL = "specfleet-target"
PROMPT = "def fibonacci(n):\n    "


@pytest.fixture(scope="module")
def fleet(models_dir):
    prefix = f"sftest-http-{uuid.uuid4().hex[:8]}"
    # the router itself wants the token: the HTTP layer must forward it
    with LocalFleet(ServeOptions(models_dir, redis_url=REDIS_URL, key_prefix=prefix, slots=8, token=TOKEN),
                    pools=("python", "suffix"), adaptive=False) as running:
        yield running
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def _serve(app):
    server, thread, port = start_http_in_thread(app, "127.0.0.1", 0)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def http(fleet):
    """The HTTP front with its own bearer check (same token as the router's)."""
    server, thread, url = _serve(build_app(fleet.router_address, TOKEN, MODEL))
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def passthrough(fleet):
    """An HTTP front without a token: the caller's Authorization header goes through to the router."""
    server, thread, url = _serve(build_app(fleet.router_address, None, MODEL))
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def reference(load_model, tokenizer):
    target = load_model("target")
    ids = tokenizer(PROMPT, add_special_tokens=False).input_ids
    with torch.no_grad():
        out = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16,
                              pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    return tokenizer.decode(out)


def _client(url, key=TOKEN):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _post(url, body=None, token=TOKEN, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120, **kw)


def test_openai_client_gets_the_targets_greedy_text_plain_and_streamed(http, reference):
    client = _client(http)
    done = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert done.choices[0].text == reference
    assert done.object == "text_completion" and done.model == MODEL and done.id.startswith("cmpl-")
    assert done.usage.completion_tokens == 16 and done.choices[0].finish_reason == "length"
    assert done.usage.total_tokens == done.usage.prompt_tokens + 16
    chunks = list(client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=16, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reference
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert len({c.id for c in chunks}) == 1
    raw = _post(http, {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in raw.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 4


def test_models_health_and_metrics(http, fleet):
    models = _client(http).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{http}/health", timeout=10).status_code == 200  # no token needed
    _post(http, {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    text = httpx.get(f"{http}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0) + sample.value
    for name in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens",
                 "spec_decode_num_accepted_tokens_per_pos"):
        assert values[f"{name}_total"] > 0, name
    assert values["specfleet_requests_total"] > 0 and values["specfleet_request_seconds_count"] > 0
    assert 'position="0"' in text
    # a front whose router is gone answers 503
    server, thread, url = _serve(build_app("127.0.0.1:1", None, MODEL))
    try:
        assert httpx.get(f"{url}/health", timeout=10).status_code == 503
        down = _post(url, {"model": MODEL, "prompt": "x"})
        assert down.status_code == 503 and down.json()["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("body,status,param,words", [
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens must be >= 1"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature", "temperature must be >= 0"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n", "n must be 1"),
    ({"model": MODEL}, 400, "prompt", "prompt is required"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400, None, "exceeds the model's context"),  # router's
])
def test_bad_requests_get_openai_errors_saying_what_to_fix(http, body, status, param, words):
    reply = _post(http, body)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert words in error["message"] and error["param"] == param and set(error) == {"message", "type", "param",
                                                                                     "code"}


def test_bad_json_and_oversized_bodies(http):
    reply = httpx.post(f"{http}/v1/completions", content=b"{not json", timeout=30,
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    big = _post(http, {"model": MODEL, "prompt": "a" * (2 << 20)})
    assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        _client(http).completions.create(model=MODEL, prompt="x", n=2)


def test_bearer_auth(http, passthrough, reference):
    missing = _post(http, {"model": MODEL, "prompt": "x"}, token=None)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{http}/v1/models", timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        _client(http, key="wrong").completions.create(model=MODEL, prompt="x", max_tokens=2)
    # no token in the HTTP layer: the router's own check answers (UNAUTHENTICATED -> 401), the right key passes
    denied = _post(passthrough, {"model": MODEL, "prompt": "x", "max_tokens": 2}, token="wrong")
    assert denied.status_code == 401 and "bearer token" in denied.json()["error"]["message"]
    done = _client(passthrough).completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert done.choices[0].text == reference


# ---------------------------------------------------------------------------------------------------- chat

CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "a fibonacci function"}]


@pytest.fixture(scope="module")
def chat_reference(load_model, tokenizer):
    """The target's own greedy answer (16 tokens) to CHAT rendered with the bundled chat template."""
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        out = load_model("target").generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16,
                                            pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    return tokenizer.decode(out)


def test_chat_completions_answer_with_the_targets_greedy_text_plain_and_streamed(http, chat_reference):
    client = _client(http)
    done = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-") and done.model == MODEL
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == chat_reference
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=16,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == chat_reference
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def _post_chat(url, body):
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=120)


@pytest.mark.parametrize("body,words", [
    ({"model": MODEL}, "messages is required"),
    ({"model": MODEL, "messages": []}, "non-empty list"),
    ({"model": MODEL, "messages": "hello"}, "non-empty list"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role must be one of"),
    ({"model": MODEL, "messages": [{"role": "user", "content": None}]}, "messages[0].content must be a string"),
    ({"model": MODEL, "messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
    ({"model": MODEL, "messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens must be >= 1"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": 5000}, "exceeds the model's context"),  # the router's
])
def test_bad_chat_requests_get_openai_errors(http, body, words):
    reply = _post_chat(http, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError):
        _client(http).chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])


def test_a_model_without_a_chat_template_says_so(http, fleet):
    tokenizer = fleet.services["router"].tokenizer
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        reply = _post_chat(http, {"model": MODEL, "messages": CHAT, "max_tokens": 2})
    finally:
        tokenizer.chat_template = template
    assert reply.status_code == 400 and "no chat template" in reply.json()["error"]["message"]


def test_served_model_name_is_listed_and_accepted(fleet):
    server, thread, url = _serve(build_app(fleet.router_address, TOKEN, "my-model"))
    try:
        client = _client(url)
        assert [m.id for m in client.models.list().data] == ["my-model"]
        done = client.chat.completions.create(model="my-model", messages=CHAT, max_tokens=2, temperature=0)
        assert done.model == "my-model" and done.usage.completion_tokens == 2
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_sdk_and_cli_chat_give_the_same_answer(fleet, chat_reference, capsys, monkeypatch):
    import asyncio

    from specfleet.cli.main import main
    from specfleet.sdk import AsyncClient, Client

    with Client(fleet.router_address, token=TOKEN, timeout=120) as client:
        assert client.chat(CHAT, max_new_tokens=16).text == chat_reference
        assert "".join(c.text for c in client.chat_stream(CHAT, max_new_tokens=16)) == chat_reference

    async def streamed():
        async with AsyncClient(fleet.router_address, token=TOKEN, timeout=120) as client:
            whole = await client.chat(CHAT, max_new_tokens=16)
            return whole.text, "".join([c.text async for c in client.chat_stream(CHAT, max_new_tokens=16)])

    assert asyncio.run(streamed()) == (chat_reference, chat_reference)
    monkeypatch.setenv("SPECFLEET_TOKEN", TOKEN)
    assert main(["client", "chat", CHAT[1]["content"], "--system", CHAT[0]["content"], "--target",
                 fleet.router_address, "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == chat_reference + "\n"
