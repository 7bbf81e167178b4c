"""Redis faults against a live fleet (real gRPC servers on loopback, a redis-server of the test's own with
persistence on: append-only file, fsync on every write). While Redis is unreachable every service answers
NOT_SERVING on gRPC health (the router's HTTP /health 503), whether Redis is down or hung (SIGSTOP), and SERVING
again once it is back, except a pod marked draining; a Redis restart mid-stream leaves the output identical to the
target's greedy decoding (the SDK resumes the request by its id), or fails with a retryable UNAVAILABLE that says
why: never a wrong token."""

import os
import signal
import time
import uuid

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specfleet.bench.reliability import PersistentRedis, stream_with_fault
from specfleet.local.inprocess import LocalFleet
from specfleet.router.http import build_app, start_http_in_thread
from specfleet.runtime.process import ServeOptions
from specfleet.state import StateStore, connect

NEW_TOKENS = 40
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def redis_server():
    with PersistentRedis() as server:
        yield server


@pytest.fixture(scope="module")
def fleet(models_dir, redis_server):
    """Model-free drafter pools (suffix, ngram: cheap) so the fusion service runs too; one verifier; the router with
    its HTTP front. Heartbeats every 0.2 s, so readiness follows Redis within about a second."""
    prefix = f"sftest-redisfault-{uuid.uuid4().hex[:8]}"
    opts = ServeOptions(models_dir, redis_url=redis_server.url, key_prefix=prefix, slots=8, heartbeat_s=0.2)
    with LocalFleet(opts, pools=("suffix", "ngram"), verifiers=1) as running:
        server, thread, port = start_http_in_thread(build_app(running.router_address))
        try:
            yield running, f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=10)


@pytest.fixture(scope="module")
def greedy(load_model, tokenizer):
    """(prompt ids, the target's own greedy continuation) for one prompt that runs the full length."""
    target = load_model("target")
    ids = tokenizer("def parse_config(path):\n    with open(path) as handle:\n", add_special_tokens=False).input_ids
    with torch.no_grad():
        want = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                               pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    return ids, want


def _health(fleet) -> dict[str, int]:
    out = {}
    for name, running in zip(fleet.services, fleet.servers, strict=True):
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            out[name] = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
    return out


def _wait_health(fleet, want: dict[str, int], timeout: float = 15.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        got = _health(fleet)
        if all(got[name] == status for name, status in want.items()) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _set_draining(fleet, redis_url: str, name: str, draining: bool) -> None:
    publisher = fleet.servers[list(fleet.services).index(name)].publisher

    async def mark():
        store = StateStore(connect(redis_url), prefix=fleet.opts.key_prefix)
        try:
            await store.set_draining(publisher.role, publisher.pod, draining)
        finally:
            await store.redis.aclose()

    fleet.run(mark(), timeout=10)


def test_redis_unreachable_means_not_serving_until_it_returns(fleet, redis_server, greedy):
    running, http_url = fleet
    names = list(running.services)
    assert {"router", "fusion", "verifier-0", "drafter-suffix", "drafter-ngram"} <= set(names)
    assert _wait_health(running, dict.fromkeys(names, SERVING)) == dict.fromkeys(names, SERVING)
    assert httpx.get(f"{http_url}/health", timeout=5).status_code == 200
    # one pod is draining before Redis goes: it must stay NOT_SERVING when Redis comes back
    _set_draining(running, redis_server.url, "drafter-ngram", True)
    assert _wait_health(running, {"drafter-ngram": NOT_SERVING})["drafter-ngram"] == NOT_SERVING
    try:
        redis_server.stop()
        down = dict.fromkeys(names, NOT_SERVING)
        assert _wait_health(running, down) == down
        reply = httpx.get(f"{http_url}/health", timeout=5)
        assert reply.status_code == 503 and reply.json()["router"] == "NOT_SERVING"
    finally:
        redis_server.start()
    back = {**dict.fromkeys(names, SERVING), "drafter-ngram": NOT_SERVING}
    assert _wait_health(running, back) == back
    time.sleep(1.0)  # several beats later the draining pod is still out
    assert _health(running)["drafter-ngram"] == NOT_SERVING
    _set_draining(running, redis_server.url, "drafter-ngram", False)
    assert _wait_health(running, dict.fromkeys(names, SERVING)) == dict.fromkeys(names, SERVING)
    assert httpx.get(f"{http_url}/health", timeout=5).status_code == 200
    ids, want = greedy
    run = stream_with_fault(running.router_address, ids, NEW_TOKENS, timeout=60)
    assert run.error == "" and run.tokens == want


def test_redis_restart_mid_stream_resumes_or_fails_retryably(fleet, redis_server, greedy):
    running, _ = fleet
    ids, want = greedy
    restarts = redis_server.restarts
    run = stream_with_fault(running.router_address, ids, NEW_TOKENS, "restart redis", redis_server.restart,
                            timeout=60)
    assert redis_server.restarts == restarts + 1 and 0 < run.injected_at < NEW_TOKENS
    assert run.offsets[0] == 0 and run.exactly_once
    if run.error:  # allowed, but only as a retryable status that says what happened; what arrived is still exact
        assert "UNAVAILABLE" in run.error and "Redis" in run.error, run.error
        assert run.tokens == want[:len(run.tokens)]
    else:
        assert run.tokens == want
    # the fleet serves again: readiness back on every service, and a fresh request is exact
    names = list(running.services)
    assert _wait_health(running, dict.fromkeys(names, SERVING)) == dict.fromkeys(names, SERVING)
    again = stream_with_fault(running.router_address, ids, NEW_TOKENS, timeout=60)
    assert again.error == "" and again.tokens == want


def test_a_hung_redis_counts_as_unreachable(fleet, redis_server, greedy):
    """SIGSTOP: connections stay open but nothing answers; a beat that hangs counts as failed after its timeout."""
    running, http_url = fleet
    names = list(running.services)
    assert _wait_health(running, dict.fromkeys(names, SERVING)) == dict.fromkeys(names, SERVING)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        down = dict.fromkeys(names, NOT_SERVING)
        assert _wait_health(running, down) == down
        assert httpx.get(f"{http_url}/health", timeout=5).status_code == 503
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert _wait_health(running, dict.fromkeys(names, SERVING)) == dict.fromkeys(names, SERVING)
    ids, want = greedy
    run = stream_with_fault(running.router_address, ids, NEW_TOKENS, timeout=60)
    assert run.error == "" and run.tokens == want
