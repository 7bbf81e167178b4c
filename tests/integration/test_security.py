"""Security of the fleet on loopback with real processes, real gRPC and the real Redis: `up` passes no secret in
a child's argv (tokens go by environment or --token-file); internal services with mTLS refuse callers without a
client certificate; a router reaching its internal services over mTLS gives the target's exact greedy output;
per-token rate limits answer RESOURCE_EXHAUSTED (HTTP 429 + Retry-After) with a retry time; a least-privilege
Redis ACL user runs every state-store operation and nothing else; no token reaches a log line or a span."""

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
import redis
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from specfleet.api.v1 import internal_pb2, internal_pb2_grpc, router_pb2, router_pb2_grpc
from specfleet.fusion.serve import start_fusion
from specfleet.local.inprocess import LocalFleet
from specfleet.local.up import child_command, child_env
from specfleet.runtime import telemetry
from specfleet.runtime.process import ServeOptions
from specfleet.runtime.security import (
    ChannelTls,
    ServerTls,
    read_tokens,
    redis_acl_rules,
    redis_acl_setuser,
    resolve_tokens,
    write_dev_certs,
)
from specfleet.runtime.server import wait_healthy
from specfleet.state import StateStore, connect
from specfleet.state.embedded import free_port

from .references import target_greedy

REDIS_URL = "redis://127.0.0.1:6379/0"
TOKENS = ("tok-greedy-4f1c9a", "tok-burst-8e22b7", "tok-http-51d0aa", "tok-logs-c3e9f4")
INTERNAL_TOKEN = "internal-tok-0b7d66e1"
RPS = 3  # per caller token: bursts of 3, then 3 a second
NEW_TOKENS = 12
SECRETS = (*TOKENS, INTERNAL_TOKEN, "wrong-token-9a9a")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    return write_dev_certs(tmp_path_factory.mktemp("certs"), days=1)


# ---------------------------------------------------------------- secrets off the command line

def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


async def _fuse_code(address: str, token: str | None) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = internal_pb2_grpc.FusionStub(channel)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            await stub.Fuse(internal_pb2.FuseRequest(request_id="r", max_nodes=4), timeout=10, metadata=metadata)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()


def test_up_starts_services_with_no_token_in_argv(tmp_path, models_dir):
    """A service started the way `up` starts one gets its token by environment, and one started with --token-file
    reads it from the file: neither token is in /proc/PID/cmdline, and each service requires its token."""
    port_env, port_file = free_port(), free_port()
    token_file = tmp_path / "token"
    token_file.write_text("# the internal token\nfile-tok-77aa01\n")
    common = ["--models", str(models_dir)]
    parent = {**os.environ, "SPECFLEET_TOKEN": "public-tok-from-ups-env"}  # must not leak into an internal service
    by_env = subprocess.Popen(child_command(["fusion"], port_env, common),
                              env=child_env({**parent, "SPECFLEET_POD_NAME": "fusion"}, token=INTERNAL_TOKEN),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    by_file = subprocess.Popen(child_command(["fusion", "--token-file", str(token_file)], port_file, common),
                               env=child_env(parent), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async def check():
            await asyncio.gather(wait_healthy(f"127.0.0.1:{port_env}", 60), wait_healthy(f"127.0.0.1:{port_file}", 60))
            return [await _fuse_code(f"127.0.0.1:{port_env}", t) for t in (None, "public-tok-from-ups-env",
                                                                           INTERNAL_TOKEN)] + \
                   [await _fuse_code(f"127.0.0.1:{port_file}", t) for t in (None, "file-tok-77aa01")]

        codes = asyncio.run(check())
        for proc in (by_env, by_file):
            argv = _cmdline(proc.pid)
            assert "serve fusion" in argv
            assert not any(s in argv for s in (INTERNAL_TOKEN, "file-tok-77aa01", "public-tok-from-ups-env"))
        unauth = grpc.StatusCode.UNAUTHENTICATED
        assert codes[:2] == [unauth, unauth] and codes[2] != unauth  # the internal token, not up's public one
        assert codes[3] == unauth and codes[4] != unauth
    finally:
        for proc in (by_env, by_file):
            proc.terminate()
        for proc in (by_env, by_file):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_child_env_carries_only_the_tokens_given():
    env = child_env({"PATH": "/bin", "SPECFLEET_TOKEN": "x", "SPECFLEET_INTERNAL_TOKEN": "y",
                     "SPECFLEET_TOKEN_FILE": "/f"}, token="a")
    assert env == {"PATH": "/bin", "SPECFLEET_TOKEN": "a"}
    assert child_env({}, token="a", internal_token="b") == {"SPECFLEET_TOKEN": "a", "SPECFLEET_INTERNAL_TOKEN": "b"}


def test_token_files_and_sources(tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text("a1\n\n# comment\n b2 \n")
    assert read_tokens(path) == ("a1", "b2")
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no token"):
        read_tokens(path)
    with pytest.raises(ValueError, match="cannot read"):
        read_tokens(tmp_path / "missing")
    with pytest.raises(ValueError, match="not both"):
        resolve_tokens("t", path, "--token")
    monkeypatch.setenv("SPECFLEET_TOKEN", "from-env")
    assert resolve_tokens(None, None, "--token", "SPECFLEET_TOKEN") == ("from-env",)
    assert resolve_tokens("flag", None, "--token", "SPECFLEET_TOKEN") == ("flag",)


def test_serve_help_never_prints_a_token_from_the_environment():
    env = {**os.environ, "SPECFLEET_TOKEN": "help-leak-tok-31", "SPECFLEET_INTERNAL_TOKEN": "help-leak-tok-32"}
    out = subprocess.run([sys.executable, "-m", "specfleet.cli", "serve", "--help"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--token-file" in out.stdout and "--tls-client-ca" in out.stdout
    assert "help-leak-tok" not in out.stdout


# ---------------------------------------------------------------- mTLS

def test_an_internal_service_with_mtls_serves_only_callers_with_a_client_certificate(certs, models_dir):
    tls = ServerTls.from_files(certs["server"], certs["server_key"], certs["ca"])
    ca = certs["ca"].read_bytes()

    async def run():
        running, _ = await start_fusion(ServeOptions(models_dir, token=INTERNAL_TOKEN, tls=tls, heartbeat_s=0))
        target = f"127.0.0.1:{running.port}"
        results = {}
        try:
            attempts = {
                "plaintext": grpc.aio.insecure_channel(target),
                "tls, no client cert": grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca)),
                "mtls": grpc.aio.secure_channel(target, ChannelTls.from_files(
                    certs["ca"], certs["client"], certs["client_key"]).credentials()),
            }
            for name, channel in attempts.items():
                async with channel:
                    stub = internal_pb2_grpc.FusionStub(channel)
                    try:
                        await stub.Fuse(internal_pb2.FuseRequest(request_id="r", max_nodes=4), timeout=5,
                                        metadata=(("authorization", f"Bearer {INTERNAL_TOKEN}"),))
                        results[name] = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as exc:
                        results[name] = exc.code()
            await wait_healthy(target, 10, tls=ChannelTls.from_files(certs["ca"], certs["client"],
                                                                      certs["client_key"]))
        finally:
            await running.stop(0.2)
        return results

    results = asyncio.run(run())
    assert results["plaintext"] == grpc.StatusCode.UNAVAILABLE
    assert results["tls, no client cert"] == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no certificate
    assert results["mtls"] not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


def test_an_mtls_service_answers_kubelet_probes_on_a_health_only_plaintext_port(certs, models_dir):
    # Kubelet's gRPC probes cannot present a client certificate: --health-port serves grpc.health.v1 (the same
    # statuses, draining included) in plaintext and nothing else.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tls = ServerTls.from_files(certs["server"], certs["server_key"], certs["ca"])

    async def check(address: str) -> object:
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                return exc.code()

    async def run():
        running, _ = await start_fusion(ServeOptions(models_dir, token=INTERNAL_TOKEN, tls=tls, heartbeat_s=0,
                                                     health_port=0))
        main, probe = f"127.0.0.1:{running.port}", f"127.0.0.1:{running.health_port}"
        results = {"main port, plaintext": await check(main), "health port": await check(probe)}
        async with grpc.aio.insecure_channel(probe) as channel:  # the health port serves nothing else
            try:
                await internal_pb2_grpc.FusionStub(channel).Fuse(
                    internal_pb2.FuseRequest(request_id="r", max_nodes=4), timeout=5,
                    metadata=(("authorization", f"Bearer {INTERNAL_TOKEN}"),))
                results["fuse on the health port"] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                results["fuse on the health port"] = exc.code()
        await running.set_serving(False)  # a draining pod
        results["health port, draining"] = await check(probe)
        await running.stop(0.2)
        results["health port, stopped"] = await check(probe)
        return results

    results = asyncio.run(run())
    assert results == {"main port, plaintext": grpc.StatusCode.UNAVAILABLE, "health port": "SERVING",
                       "fuse on the health port": grpc.StatusCode.UNIMPLEMENTED,
                       "health port, draining": "NOT_SERVING", "health port, stopped": grpc.StatusCode.UNAVAILABLE}


CERT_FILES = ("ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem")


def _mounted_certs(folder: Path, version: str) -> dict[str, Path]:
    """Certificates laid out as Kubernetes mounts a Secret: each file a symlink into `..data`, itself a symlink to a
    versioned folder, which a renewal swaps in one rename (so a reader never sees half a set)."""
    made = write_dev_certs(folder / version, days=1)
    link = folder / "..data.tmp"
    link.symlink_to(version)
    os.replace(link, folder / "..data")
    for name in CERT_FILES:
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(Path("..data") / name)
    return {key: folder / path.name for key, path in made.items()}


def _client(certs: dict[str, Path]) -> ChannelTls:
    return ChannelTls.from_files(certs["ca"], certs["client"], certs["client_key"])


def test_a_renewed_certificate_is_served_and_presented_without_a_restart(tmp_path, models_dir, load_model, tokenizer):
    # cert-manager rewrites the mounted Secret: the internal services serve the new certificate on new handshakes
    # and the router rebuilds its channels with the new client certificate; generation goes on, output unchanged.
    mounted = _mounted_certs(tmp_path, "v1")
    old = {k: Path(os.path.realpath(v)).read_bytes() for k, v in mounted.items()}
    prefix = f"sftest-rot-{uuid.uuid4().hex[:8]}"
    opts = ServeOptions(models_dir, redis_url=REDIS_URL, key_prefix=prefix, slots=4, token="public-token")
    server_tls = ServerTls.from_files(mounted["server"], mounted["server_key"], mounted["ca"])
    prompt = "def parse_args(argv):\n    "
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    (expected,) = target_greedy(load_model("target"), [ids], 12, tokenizer.pad_token_id)
    try:
        with LocalFleet(opts, pools=("suffix", "ngram"), adaptive=False, internal_token=INTERNAL_TOKEN,
                        internal_tls=server_tls, internal_client_tls=_client(mounted)) as fleet:
            def generated() -> list[int]:
                replies = asyncio.run(_generate(fleet.router_address, "public-token", prompt=prompt,
                                                max_new_tokens=12))
                return [t for m in replies for t in m.token_ids]

            assert generated() == expected
            old_client = ChannelTls(old["ca"], old["client"], old["client_key"])
            _mounted_certs(tmp_path, "v2")  # a new CA, so that the old client certificate is refused from now on
            fusion = f"127.0.0.1:{fleet.servers[list(fleet.services).index('fusion')].port}"

            async def health(tls: ChannelTls) -> bool:
                try:
                    await wait_healthy(fusion, 3, tls=tls)
                    return True
                except TimeoutError:
                    return False

            assert asyncio.run(health(_client(mounted)))  # the new certificate on the next handshake
            assert not asyncio.run(health(old_client))
            router = fleet.services["router"]
            deadline = time.monotonic() + 10
            while router.config.internal_tls.ca == old["ca"] and time.monotonic() < deadline:
                time.sleep(0.2)  # the router's discovery loop (every second) notices the new files
            assert router.config.internal_tls.ca != old["ca"]
            assert generated() == expected
            # a broken renewal (a certificate that is not PEM) is ignored: the last good one stays in use
            current = _client(mounted)
            broken = tmp_path / "v3"
            broken.mkdir()
            for name in CERT_FILES:
                (broken / name).write_bytes(b"not a certificate" if name == "server.pem" else
                                            (tmp_path / "v2" / name).read_bytes())
            (tmp_path / "..data.tmp").symlink_to("v3")
            os.replace(tmp_path / "..data.tmp", tmp_path / "..data")
            assert asyncio.run(health(current))
            assert generated() == expected
    finally:
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(f"{prefix}:*"))
        if keys:
            r.delete(*keys)


def test_tls_options_say_what_is_missing(certs, tmp_path):
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        ServerTls.from_files(certs["server"], None)
    with pytest.raises(ValueError, match="needs --tls-cert"):
        ServerTls.from_files(None, None, certs["ca"])
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="not PEM"):
        ServerTls.from_files(tmp_path / "junk.pem", certs["server_key"])
    with pytest.raises(ValueError, match="internal-tls-key"):
        ChannelTls.from_files(certs["ca"], certs["client"], None)
    assert ServerTls.from_files(None, None) is None and ChannelTls.from_files(None) is None


# ---------------------------------------------------------------- a fleet: mTLS inside, tokens and rate limits

@pytest.fixture(scope="module")
def spans():
    exporter = InMemorySpanExporter()
    assert telemetry.configure_tracing("specfleet-security-test", exporter=exporter)
    yield exporter
    telemetry.shutdown_tracing()


@pytest.fixture(scope="module")
def fleet(models_dir, certs, spans):
    prefix = f"sftest-sec-{uuid.uuid4().hex[:8]}"
    opts = ServeOptions(models_dir, redis_url=REDIS_URL, key_prefix=prefix, slots=8, token=TOKENS, rate_limit_rps=RPS)
    internal = ServerTls.from_files(certs["server"], certs["server_key"], certs["ca"])
    client = ChannelTls.from_files(certs["ca"], certs["client"], certs["client_key"])
    try:
        with LocalFleet(opts, pools=("suffix", "ngram"), adaptive=False, internal_token=INTERNAL_TOKEN,
                        internal_tls=internal, internal_client_tls=client) as running:
            yield running
    finally:
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(f"{prefix}:*"))
        if keys:
            r.delete(*keys)


async def _generate(address: str, token: str | None, **fields):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return [m async for m in stub.Generate(router_pb2.GenerateRequest(**fields), timeout=120, metadata=metadata)]


def test_a_router_with_internal_mtls_gives_the_target_greedy_output(fleet, load_model, tokenizer):
    prompts = ["def parse_args(argv):\n    ", "The weather today is", "int main(void) {\n    "]
    target = load_model("target")
    for prompt in prompts:  # one at a time: the token's burst (RPS) covers them
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            want = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                   pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        messages = asyncio.run(_generate(fleet.router_address, TOKENS[0], prompt_token_ids=ids,
                                         max_new_tokens=NEW_TOKENS))
        assert [t for m in messages for t in m.token_ids] == want
    assert fleet.services["drafter-suffix"].snapshot()["steps"] > 0  # drafts went over the mTLS channel


def test_over_the_rate_limit_a_caller_gets_resource_exhausted_with_a_retry_time(fleet):
    async def burst():
        async def one(token):
            try:
                await _generate(fleet.router_address, token, prompt="hello", max_new_tokens=1)
                return "ok", None
            except grpc.aio.AioRpcError as exc:
                return exc.code(), (exc.details(), dict(exc.trailing_metadata() or ()))

        return await asyncio.gather(*(one(TOKENS[1]) for _ in range(2 * RPS + 2))), await one(TOKENS[0])

    results, other = asyncio.run(burst())
    refused = [detail for code, detail in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(refused) >= RPS and sum(code == "ok" for code, _ in results) >= 1
    assert all(code in ("ok", grpc.StatusCode.RESOURCE_EXHAUSTED) for code, _ in results)
    message, trailer = refused[0]
    assert "rate limit" in message and "retry after 1 s" in message and trailer["retry-after"] == "1"
    assert other[0] == "ok"  # another token has its own bucket
    time.sleep(1.1)
    assert asyncio.run(_generate(fleet.router_address, TOKENS[1], prompt="hello", max_new_tokens=1))  # refilled


def test_a_wrong_token_is_refused_before_any_rate_limit(fleet):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_generate(fleet.router_address, "wrong-token-9a9a", prompt="hello", max_new_tokens=1))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_http_front_answers_429_with_retry_after(fleet):
    import httpx

    from specfleet.router.http import build_app, start_http_in_thread

    app = build_app(fleet.router_address, None)  # passes each caller's token on: the router limits per token
    server, thread, port = start_http_in_thread(app, "127.0.0.1", 0)
    try:
        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"model": "specfleet-target", "prompt": "hello", "max_tokens": 1}
                headers = {"Authorization": f"Bearer {TOKENS[2]}"}
                return await asyncio.gather(*(client.post(f"http://127.0.0.1:{port}/v1/completions", json=body,
                                                          headers=headers) for _ in range(2 * RPS + 2)))

        replies = asyncio.run(burst())
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    limited = [r for r in replies if r.status_code == 429]
    assert len(limited) >= RPS and all(r.status_code in (200, 429) for r in replies)
    assert limited[0].headers["retry-after"] == "1"
    assert limited[0].json()["error"]["type"] == "rate_limit_error"
    assert "retry after" in limited[0].json()["error"]["message"]


def test_no_token_reaches_a_log_line_or_a_span(fleet, spans, caplog):
    caplog.set_level(logging.DEBUG)
    asyncio.run(_generate(fleet.router_address, TOKENS[3], prompt="def f(x):", max_new_tokens=6))
    for token in ("wrong-token-9a9a", None):
        with pytest.raises(grpc.aio.AioRpcError):
            asyncio.run(_generate(fleet.router_address, token, prompt="hi", max_new_tokens=2))
    fleet.stop_role("drafter-ngram")  # a failing internal call is logged: with its error, never its metadata
    asyncio.run(_generate(fleet.router_address, TOKENS[3], prompt="def g(y):", max_new_tokens=6))
    time.sleep(0.5)  # server spans end just after the last message
    lines = [record.getMessage() for record in caplog.records]
    assert any("ngram" in line for line in lines), lines  # the stopped drafter's failures were logged
    for line in lines:
        assert not any(secret in line for secret in SECRETS), line
        assert "Bearer" not in line
    finished = spans.get_finished_spans()
    assert len(finished) > 5
    for span in finished:
        text = json.dumps({"name": span.name, "attributes": dict(span.attributes),
                           "events": [(e.name, dict(e.attributes)) for e in span.events],
                           "resource": dict(span.resource.attributes)}, default=str)
        assert not any(secret in text for secret in SECRETS) and "Bearer" not in text, span.name


# ---------------------------------------------------------------- Redis ACL

@pytest.fixture
def acl_user():
    admin = redis.Redis.from_url(REDIS_URL)
    tag = uuid.uuid4().hex[:8]
    user, password, prefix = f"sftest-acl-{tag}", uuid.uuid4().hex, f"sftest-acl-{tag}"
    admin.execute_command("ACL", "SETUSER", user, *redis_acl_rules(prefix, password))
    admin.set(f"other-{prefix}:secret", b"x", ex=60)
    try:
        yield user, password, prefix
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        for key in [*admin.scan_iter(f"{prefix}:*"), f"other-{prefix}:secret"]:
            admin.delete(key)
        admin.close()


def test_redis_acl_line_grants_the_prefix_only():
    line = redis_acl_setuser("specfleet", "prod", "pw")
    assert line.startswith("ACL SETUSER specfleet reset on #") and " ~prod:* " in line and "pw " not in line
    assert "-@all" in line and "+flushall" not in line and "+config" not in line and "+keys" not in line
    with pytest.raises(ValueError, match="prefix"):
        redis_acl_rules("bad*prefix", "pw")


def test_every_state_store_operation_runs_as_the_least_privilege_user(acl_user):
    user, password, prefix = acl_user

    async def run():
        client = connect(f"redis://{user}:{password}@127.0.0.1:6379/0")
        store = StateStore(client, prefix=prefix)
        try:
            assert await store.ping() and await store.server_time_ms() > 0
            state = await store.create_request("r1", [1, 2, 3], {"temperature": 0.0})
            assert state.round == 0
            assert (await store.commit_round("r1", 0, [4, 5])).applied
            assert (await store.commit_round("r1", 0, [4, 5])).outcome == "retry"
            job = await store.enqueue("verify", b"job")
            await store.consume("verify", "verifiers", "c0", count=1)
            assert (await store.commit_and_answer("r1", 1, [6], False, "", "verify", "verifiers", job, "reply.x",
                                                  b"answer")).applied
            assert [p for _, p in await store.read_after("reply.x", "0-0")] == [b"answer"]
            assert (await store.get("r1")).output_ids == [4, 5, 6]
            await store.create_request("r2", [1], {})
            assert (await store.fail("r2", "test")).status == "failed"
            assert await store.delete("r2")
            await store.heartbeat("verifier", "pod-a", {"load": 0.5}, ttl_s=5)
            await store.set_draining("verifier", "pod-a", True)
            beats = await store.heartbeats()
            assert [(b["pod"], b["draining"]) for b in beats] == [("pod-a", True)]
            await store.set_draining("verifier", "pod-a", False)
            await store.withdraw_heartbeat("verifier", "pod-a")
            assert await store.update_score("python", "drafter-a", 2.0) == 2.0
            assert await store.scores("python") == {"drafter-a": 2.0}
            await store.enqueue("work", b"job-1")
            await store.enqueue("work", b"job-2")
            jobs = await store.consume("work", "g", "c1", count=1)
            assert [p for _, p in jobs] == [b"job-1"]
            assert (await store.queue_stats("work", "g"))["pending"] == 1
            assert await store.ack("work", "g", [jobs[0][0]]) == 1
            await store.consume("work", "g", "c1", count=1)
            reclaimed = await store.reclaim("work", "g", "c2", min_idle_ms=0)
            assert [p for _, p in reclaimed] == [b"job-2"]
            await store.keep_claims("work", "g", "c2", [reclaimed[0][0]])  # a busy verifier keeps its jobs
            assert await store.withdrawn("work", "g", [reclaimed[0][0]]) == []
            await store.requeue("work", "g", reclaimed)  # a draining one hands them back
            if hasattr(store, "ack_and_send"):  # the verify queue's reply path
                await store.ack_and_send("work", "g", [], "replies", b"answer")
                assert [p for _, p in await store.take("replies")] == [b"answer"]
            denied = []
            for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("GET", f"other-{prefix}:secret"),
                            ("SET", "unprefixed", "x"), ("ACL", "LIST"), ("CLIENT", "LIST"),
                            ("PUBLISH", "c", "x")):
                try:
                    await client.execute_command(*command)
                except redis.exceptions.NoPermissionError:
                    denied.append(command[0])
            assert denied == ["FLUSHALL", "CONFIG", "KEYS", "GET", "SET", "ACL", "CLIENT", "PUBLISH"]
            with pytest.raises(redis.exceptions.NoPermissionError):  # a script cannot reach other keys either
                await client.eval("return redis.call('GET', KEYS[1])", 1, f"other-{prefix}:secret")
            assert await store.purge() > 0
        finally:
            await client.aclose()

    asyncio.run(run())
