"""The client SDK against real gRPC routers on 127.0.0.1: a scripted Router servicer emits a fixed token sequence
and can fail over, replay, reject, demand a token or stall, and every token must reach the caller exactly once."""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest

from specfleet.api.v1 import router_pb2, router_pb2_grpc
from specfleet.sdk import AsyncClient, Chunk, Client, Completion, SpecfleetError
from specfleet.sdk.cli import add_client_parser

TOKENS = list(range(101, 113))  # the scripted completion: 12 tokens
PROMPT_TOKENS = 3
FAST = {"backoff": 0.01, "timeout": 5.0}  # every call is bounded; backoff kept short so the file stays quick


def piece(token: int) -> str:
    return f"w{token} "


FULL_TEXT = "".join(piece(t) for t in TOKENS)


@dataclass
class Script:
    """What the scripted router does; shared by every server of one test (attempts are counted across them)."""

    chunk: int = 2  # tokens per message on the first attempt
    fail_after: int | None = None  # abort after this many messages ...
    failing_attempts: int = 1  # ... on attempts 1..failing_attempts
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    fail_message: str = "injected failover"
    replay_from: int = 0  # offset where a retry restarts ...
    resume_where_stopped: bool = False  # ... or the end of what earlier attempts sent
    replay_chunk: int | None = None  # tokens per message on retries (default: chunk)
    replay_tokens: list[int] | None = None  # a misbehaving router: different tokens on retries
    abort: tuple[grpc.StatusCode, str] | None = None  # reject every call with this status
    token: str | None = None  # demand `authorization: Bearer <token>`
    stall_s: float = 0.0  # sleep this long before answering (past a deadline)
    complete_failures: int = 0  # Complete fails with UNAVAILABLE on its first attempts
    requests: list[router_pb2.GenerateRequest] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    sent: int = 0  # tokens sent so far, over all attempts
    lock: threading.Lock = field(default_factory=threading.Lock)


class ScriptedRouter(router_pb2_grpc.RouterServicer):
    def __init__(self, script: Script, on_fail=None):
        self.script = script
        self.on_fail = on_fail  # called instead of aborting (e.g. to kill this server)

    def _begin(self, request, context) -> int:
        s = self.script
        with s.lock:
            s.requests.append(request)
            s.metadata.append(dict(context.invocation_metadata()))
            attempt = len(s.requests)
        if s.token is not None and s.metadata[attempt - 1].get("authorization") != f"Bearer {s.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if s.abort is not None:
            context.abort(*s.abort)
        end = time.monotonic() + s.stall_s
        while context.is_active() and time.monotonic() < end:
            time.sleep(0.01)
        return attempt

    def Generate(self, request, context):
        s = self.script
        attempt = self._begin(request, context)
        n = min(request.max_new_tokens, len(TOKENS))
        tokens = s.replay_tokens if attempt > 1 and s.replay_tokens else TOKENS
        chunk = s.chunk if attempt == 1 else (s.replay_chunk or s.chunk)
        start = 0 if attempt == 1 else s.sent if s.resume_where_stopped else s.replay_from
        for sent, offset in enumerate(range(start, n, chunk)):
            if s.fail_after is not None and attempt <= s.failing_attempts and sent == s.fail_after:
                if self.on_fail is None:
                    context.abort(s.fail_code, s.fail_message)
                self.on_fail()
                while context.is_active():
                    time.sleep(0.01)
                return
            ids = tokens[offset:min(offset + chunk, n)]
            end = offset + len(ids)
            s.sent = max(s.sent, end)
            yield router_pb2.GenerateResponse(
                request_id=request.request_id, text="".join(piece(t) for t in ids), token_ids=ids, offset=offset,
                finished=end == n, finish_reason="length" if end == n else "",
                usage=router_pb2.Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=end, rounds=end // 2,
                                       draft_tokens=end, accepted_tokens=end // 2))

    def Complete(self, request, context):
        attempt = self._begin(request, context)
        if attempt <= self.script.complete_failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "replica went away")
        ids = TOKENS[:request.max_new_tokens]
        return router_pb2.GenerateResponse(
            request_id=request.request_id, text="".join(piece(t) for t in ids), token_ids=ids, finished=True,
            finish_reason="length", usage=router_pb2.Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=len(ids)))


def start_server(servicer, port: int = 0, credentials=None) -> tuple[grpc.Server, int]:
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    address = f"127.0.0.1:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    return server, bound


@pytest.fixture
def serve():
    """serve(script) -> target of a running scripted router; stopped after the test."""
    servers = []

    def start(script: Script, credentials=None) -> str:
        server, port = start_server(ScriptedRouter(script), credentials=credentials)
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, read, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(client: Client, method: str):
    """generate (drained) or complete with a default prompt."""
    result = getattr(client, method)("hello")
    return list(result) if method == "generate" else result


def assert_exactly_once(chunks: list[Chunk], n: int = len(TOKENS)) -> None:
    assert [t for c in chunks for t in c.token_ids] == TOKENS[:n]
    assert "".join(c.text for c in chunks) == "".join(piece(t) for t in TOKENS[:n])
    offsets = [c.offset for c in chunks]
    assert offsets == [sum(len(c.token_ids) for c in chunks[:i]) for i in range(len(chunks))]
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    assert not any(c.finished for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].usage.prompt_tokens == PROMPT_TOKENS


def run_async(coro, timeout: float = 10.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect_async(target: str, client_kwargs: dict, **request) -> list[Chunk]:
    async with AsyncClient(target, **client_kwargs) as client:
        return [chunk async for chunk in client.generate("hello", **request)]


# ---------------------------------------------------------------- streaming across failovers

FAILOVERS = {  # Script options of a router that fails over mid-stream, then replays or resumes
    "replay-from-0-rechunked": {"fail_after": 3, "replay_chunk": 3},
    "replay-from-0-token-by-token": {"fail_after": 3, "replay_chunk": 1},
    "resume-at-earlier-message": {"fail_after": 3, "replay_from": 2, "replay_chunk": 2},
    "resume-where-it-stopped": {"fail_after": 3, "replay_from": 6, "replay_chunk": 4},
    "resume-mid-message-realigning": {"fail_after": 3, "replay_from": 3, "replay_chunk": 3},
    "fails-again-during-replay": {"fail_after": 3, "failing_attempts": 2, "replay_chunk": 1},
    "deadline-then-resume": {"fail_after": 2, "fail_code": grpc.StatusCode.DEADLINE_EXCEEDED},
    "overloaded-then-resume": {"fail_after": 1, "fail_code": grpc.StatusCode.RESOURCE_EXHAUSTED},
    "reset-seen-as-internal": {"fail_after": 1, "fail_code": grpc.StatusCode.INTERNAL,
                               "fail_message": "Received RST_STREAM with error code 2"},
}


@pytest.mark.parametrize("name", list(FAILOVERS))
def test_stream_yields_every_token_once_across_a_failover(name, serve):
    script = Script(**FAILOVERS[name])
    target = serve(script)
    with Client(target, retries=2, **FAST) as client:
        chunks = list(client.generate("hello", max_new_tokens=12))
    assert_exactly_once(chunks)
    assert len(script.requests) == script.failing_attempts + 1
    ids = {r.request_id for r in script.requests}
    assert len(ids) == 1 and len(ids.pop()) == 32  # one client-made uuid4 hex, reused by every retry
    assert len({r.seed for r in script.requests}) == 1  # the random seed is fixed for the whole call


def test_progress_renews_the_retry_budget(serve):
    """Five failovers in one stream with retries=1: each attempt delivers new tokens, so none is the last straw."""
    script = Script(fail_after=1, failing_attempts=5, resume_where_stopped=True)
    with Client(serve(script), retries=1, **FAST) as client:
        assert_exactly_once(list(client.generate("hello")))
    assert len(script.requests) == 6


def test_internal_error_is_not_retried(serve):
    script = Script(abort=(grpc.StatusCode.INTERNAL, "verifier crashed: CUDA error"))
    with Client(serve(script), retries=3, **FAST) as client, pytest.raises(SpecfleetError) as err:
        list(client.generate("hello"))
    assert err.value.code == grpc.StatusCode.INTERNAL and len(script.requests) == 1


def test_failover_to_another_server_on_the_same_port():
    """A real failover: the replica serving the stream dies (server stopped, connection gone) and a second
    replica listening on the same port replays the request from offset 0."""
    script = Script(chunk=2, fail_after=3, replay_chunk=5)
    servers: list[grpc.Server] = []

    def add(port: int) -> int:
        holder: list[grpc.Server] = []
        server, bound = start_server(ScriptedRouter(script, on_fail=lambda: threading.Thread(
            target=holder[0].stop, args=(0,)).start()), port=port)
        holder.append(server)
        servers.append(server)
        return bound

    port = add(0)
    add(port)  # SO_REUSEPORT: both listen until the first dies
    try:
        with Client(f"127.0.0.1:{port}", retries=4, **FAST) as client:
            chunks = list(client.generate("hello", max_new_tokens=12, request_id="req-failover"))
    finally:
        for server in servers:
            server.stop(0)
    assert_exactly_once(chunks)
    assert [r.request_id for r in script.requests] == ["req-failover", "req-failover"]


def test_a_failed_attempt_moves_on_to_the_next_router_replica(serve):
    """The SDK given several routers: the first hands the stream over (a draining router in a rolling update ends it
    with UNAVAILABLE after a few messages, and refuses it from then on); the retry goes to the next replica, which
    replays from offset 0, and every token reaches the caller once. Sync and asyncio alike."""
    for mode in ("sync", "async"):
        draining = Script(fail_after=2, failing_attempts=100, fail_message="router draining (rolling update): stream "
                          "handed over after 4 tokens; resume with request_id req-rolling on another router replica")
        other = Script(chunk=5)
        targets = [serve(draining), serve(other)]
        if mode == "sync":
            with Client(targets, retries=1, **FAST) as client:
                chunks = list(client.generate("hello", max_new_tokens=12, request_id="req-rolling"))
        else:
            async def run(targets=tuple(targets)):
                async with AsyncClient(targets, retries=1, **FAST) as client:
                    return [c async for c in client.generate("hello", max_new_tokens=12, request_id="req-rolling")]

            chunks = asyncio.run(run())
        assert_exactly_once(chunks)
        assert [r.request_id for r in draining.requests + other.requests] == ["req-rolling", "req-rolling"]

def test_stream_stops_at_max_new_tokens_and_early_break_is_clean(serve):
    target = serve(Script(chunk=3))
    with Client(target, **FAST) as client:
        assert_exactly_once(list(client.generate(prompt_token_ids=[1, 2, 3], max_new_tokens=5)), n=5)
        stream = client.generate("hello")
        first = next(stream)
        stream.close()  # cancels the RPC
        assert first.token_ids == TOKENS[:3] and first.offset == 0


@pytest.mark.parametrize("script,fragment", [
    (Script(fail_after=3, replay_tokens=[7] * 12), "differ from those already received"),
    (Script(fail_after=3, replay_from=8), "resumed at token 8 but 6 tokens were received"),
    (Script(fail_after=3, replay_from=3, replay_chunk=4), "no earlier message began or ended"),
], ids=["different-tokens", "gap", "unaligned"])
def test_a_replay_that_would_lose_or_change_tokens_is_an_error(script, fragment, serve):
    with Client(serve(script), retries=2, **FAST) as client, pytest.raises(SpecfleetError) as err:
        list(client.generate("hello"))
    assert err.value.code == grpc.StatusCode.DATA_LOSS and fragment in err.value.message


# ---------------------------------------------------------------- complete, retries, errors

def test_complete_retries_with_the_same_request_id(serve):
    script = Script(complete_failures=2)
    with Client(serve(script), retries=2, **FAST) as client:
        result = client.complete("hello", max_new_tokens=4, stop=["\n"], drafters=["python"], seed=7)
    assert result == Completion(text="".join(piece(t) for t in TOKENS[:4]), token_ids=TOKENS[:4],
                                finish_reason="length", usage=result.usage, request_id=script.requests[0].request_id,
                                attempts=3)
    assert result.usage.completion_tokens == 4
    assert len(script.requests) == 3 and len({r.request_id for r in script.requests}) == 1
    sent = script.requests[0]
    assert (sent.prompt, sent.max_new_tokens, list(sent.stop), list(sent.drafters), sent.seed) == (
        "hello", 4, ["\n"], ["python"], 7)


@pytest.mark.parametrize("method", ["generate", "complete"])
def test_retries_stop_after_the_budget(method, serve):
    script = Script(abort=(grpc.StatusCode.UNAVAILABLE, "router draining"))
    with Client(serve(script), retries=2, **FAST) as client, pytest.raises(SpecfleetError) as err:
        call(client, method)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.message == "router draining"
    assert err.value.attempts == 3 and len(script.requests) == 3
    assert "gave up after 3 attempts" in str(err.value)


def test_no_server_is_unavailable_after_retries():
    with Client(f"127.0.0.1:{free_port()}", retries=1, **FAST) as client:
        with pytest.raises(SpecfleetError) as err:
            client.complete("hello")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.attempts == 2


@pytest.mark.parametrize("method", ["generate", "complete"])
def test_invalid_argument_is_not_retried_and_keeps_the_message(method, serve):
    message = "prompt + max_new_tokens = 600 exceeds the model's context of 512 tokens"
    script = Script(abort=(grpc.StatusCode.INVALID_ARGUMENT, message))
    with Client(serve(script), retries=3, **FAST) as client, pytest.raises(SpecfleetError) as err:
        call(client, method)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.message == message
    assert err.value.attempts == 1 and len(script.requests) == 1
    assert str(err.value) == f"INVALID_ARGUMENT: {message}"


def test_bearer_token_is_sent_and_required(serve):
    script = Script(token="s3cret")
    target = serve(script)
    with Client(target, token="s3cret", **FAST) as client:
        assert client.complete("hello", max_new_tokens=2).token_ids == TOKENS[:2]
        assert_exactly_once(list(client.generate("hello")))
    assert script.metadata[0]["authorization"] == "Bearer s3cret"
    for token in (None, "wrong"):
        with Client(target, token=token, retries=3, **FAST) as client, pytest.raises(SpecfleetError) as err:
            client.complete("hello")
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and err.value.attempts == 1


@pytest.mark.parametrize("method", ["generate", "complete"])
def test_deadline_fires_and_is_retried(method, serve):
    script = Script(stall_s=3.0)
    start = time.monotonic()
    with Client(serve(script), timeout=0.2, retries=1, backoff=0.0) as client, pytest.raises(SpecfleetError) as err:
        call(client, method)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.attempts == 2
    assert len(script.requests) == 2 and time.monotonic() - start < 2.0


# ---------------------------------------------------------------- TLS

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"), "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=30)
    return folder / "key.pem", folder / "cert.pem"


def test_tls_with_a_private_ca_and_a_token(tls_files, serve):
    key, cert = tls_files
    script = Script(token="t0k")
    target = serve(script, credentials=grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    with Client(target, token="t0k", tls=True, root_certificates=cert, **FAST) as client:
        assert_exactly_once(list(client.generate("hello")))
    with Client(target, token="t0k", root_certificates=cert.read_bytes(), **FAST) as client:  # implies tls
        assert client.complete("hello", max_new_tokens=3).token_ids == TOKENS[:3]
    with Client(target, token="t0k", retries=0, **FAST) as client, pytest.raises(SpecfleetError) as err:
        client.complete("hello")  # plaintext to a TLS port
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- asyncio

@pytest.mark.parametrize("name", ["replay-from-0-rechunked", "resume-where-it-stopped", "fails-again-during-replay"])
def test_async_stream_yields_every_token_once_across_a_failover(name, serve):
    script = Script(**FAILOVERS[name])
    chunks = run_async(collect_async(serve(script), {"retries": 2, **FAST}, max_new_tokens=12))
    assert_exactly_once(chunks)
    assert len({r.request_id for r in script.requests}) == 1 and len(script.requests) == script.failing_attempts + 1


def test_async_complete_and_errors(serve):
    ok = Script(complete_failures=1, token="k")
    rejecting = Script(abort=(grpc.StatusCode.INVALID_ARGUMENT, "top_k must be >= 0"))
    draining = Script(abort=(grpc.StatusCode.UNAVAILABLE, "router draining"))
    ok_target, rejecting_target, draining_target = serve(ok), serve(rejecting), serve(draining)

    async def scenario():
        async with AsyncClient(ok_target, token="k", retries=1, **FAST) as client:
            result = await client.complete("hello", max_new_tokens=5, request_id="abc")
        assert result.token_ids == TOKENS[:5] and result.request_id == "abc"
        assert [r.request_id for r in ok.requests] == ["abc", "abc"]
        assert ok.metadata[0]["authorization"] == "Bearer k"
        async with AsyncClient(ok_target, retries=3, **FAST) as client:
            with pytest.raises(SpecfleetError) as err:
                await client.complete("hello")
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and err.value.attempts == 1
        async with AsyncClient(rejecting_target, retries=3, **FAST) as client:
            with pytest.raises(SpecfleetError) as err:
                [c async for c in client.generate("hello")]
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.message == "top_k must be >= 0"
        async with AsyncClient(draining_target, retries=2, **FAST) as client:
            with pytest.raises(SpecfleetError) as err:
                [c async for c in client.generate("hello")]
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.attempts == 3

    run_async(scenario())
    assert len(rejecting.requests) == 1 and len(draining.requests) == 3


def test_async_deadline_fires_and_is_retried(serve):
    script = Script(stall_s=3.0)
    target = serve(script)

    async def scenario():
        async with AsyncClient(target, timeout=0.2, retries=1, backoff=0.0) as client:
            with pytest.raises(SpecfleetError) as err:
                [c async for c in client.generate("hello")]
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.attempts == 2
            with pytest.raises(SpecfleetError) as err:
                await client.complete("hello")
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.attempts == 2

    run_async(scenario())
    assert len(script.requests) == 4


# ---------------------------------------------------------------- client-side validation

@pytest.mark.parametrize("kwargs,fragment", [
    ({}, "the prompt is empty"),
    ({"prompt": ""}, "the prompt is empty"),
    ({"prompt": "x", "prompt_token_ids": [1]}, "not both"),
    ({"prompt_token_ids": [1, -2]}, "prompt_token_ids must be token ids"),
    ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"prompt": "x", "max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1"),
    ({"prompt": "x", "temperature": math.nan}, "temperature must be a finite number >= 0"),
    ({"prompt": "x", "temperature": -0.1}, "temperature must be a finite number >= 0"),
    ({"prompt": "x", "top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"prompt": "x", "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"prompt": "x", "top_p": math.nan}, "top_p must be in (0, 1]"),
    ({"prompt": "x", "top_k": -1}, "top_k must be an integer >= 0"),
    ({"prompt": "x", "seed": 2**64}, "seed must be a 64-bit integer"),
    ({"prompt": "x", "stop": [""]}, "stop must be non-empty strings"),
    ({"prompt": "x", "request_id": ""}, "request_id must be a non-empty string"),
])
def test_bad_arguments_fail_before_any_call(kwargs, fragment):
    script = Script()
    server, port = start_server(ScriptedRouter(script))
    try:
        with Client(f"127.0.0.1:{port}", **FAST) as client:
            for call in (client.generate, client.complete):  # generate raises at the call, not at the first next()
                with pytest.raises(ValueError) as err:
                    call(**kwargs)
                assert fragment in str(err.value)
        with pytest.raises(ValueError) as err:
            AsyncClient(f"127.0.0.1:{port}").generate(**kwargs)
        assert fragment in str(err.value)
    finally:
        server.stop(0)
    assert script.requests == []


@pytest.mark.parametrize("kwargs,fragment", [
    ({"timeout": 0}, "timeout must be"),
    ({"retries": -1}, "retries must be"),
    ({"backoff": math.inf}, "backoff must be"),
    ({"token": "a\nb"}, "token must be"),
    ({"root_certificates": "/nonexistent/ca.pem"}, "no PEM file at /nonexistent/ca.pem"),
    ({"max_message_mb": 0}, "max_message_mb must be"),
])
def test_bad_client_options_fail_at_construction(kwargs, fragment):
    for cls in (Client, AsyncClient):
        with pytest.raises(ValueError) as err:
            cls("127.0.0.1:1", **kwargs)
        assert fragment in str(err.value)


def test_bad_targets_fail_at_construction():
    for cls in (Client, AsyncClient):
        for target in ([], ["127.0.0.1:1", ""], "", 7):
            with pytest.raises(ValueError) as err:
                cls(target)
            assert "target must be 'host:port' or a list of them" in str(err.value)


# ---------------------------------------------------------------- `specfleet client generate`

def client_cli(argv: list[str]):
    parser = argparse.ArgumentParser(prog="specfleet")
    add_client_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["client", "generate", *argv])
    return args.func(args)


def test_cli_streams_text_and_reports_usage(serve, capsys):
    script = Script(token="tk", fail_after=2, replay_chunk=5)
    target = serve(script)
    assert client_cli(["say hi", "--target", target, "--token", "tk", "--max-new-tokens", "12", "--seed", "5",
                       "--timeout", "5"]) == 0
    out, err = capsys.readouterr()
    assert out == FULL_TEXT + "\n"
    assert "[12 tokens, finish_reason=length, prompt 3 tokens" in err
    assert script.requests[0].prompt == "say hi" and script.requests[0].seed == 5


def test_cli_reads_the_token_from_the_environment(serve, capsys, monkeypatch):
    monkeypatch.setenv("SPECFLEET_TOKEN", "from-env")
    script = Script(token="from-env")
    assert client_cli(["hi", "--target", serve(script), "--max-new-tokens", "2", "--timeout", "5"]) == 0
    assert capsys.readouterr().out == "".join(piece(t) for t in TOKENS[:2]) + "\n"


@pytest.mark.parametrize("argv,fragment", [
    (["--top-p", "2"], "error: top_p must be in (0, 1]"),
    (["--token", "nope"], "error: UNAUTHENTICATED: missing or wrong bearer token"),
])
def test_cli_errors_say_what_is_wrong(argv, fragment, serve, monkeypatch):
    monkeypatch.delenv("SPECFLEET_TOKEN", raising=False)
    target = serve(Script(token="tk"))
    with pytest.raises(SystemExit) as exc:
        client_cli(["hi", "--target", target, "--timeout", "5", *argv])
    assert str(exc.value.code).startswith(fragment)

