"""`specfleet bench reliability` and the fault harness its tests share: the fleet as real processes (one
`specfleet serve ROLE` each, gRPC on loopback, one Redis), faults injected into a live stream (kill -9 of a drafter,
the fusion service, a verifier or the router; SIGSTOP of a verifier; a restart of the fleet's own persistent
Redis), a seeded fuzz of the public gRPC and HTTP
APIs, and a bounded load run with each service's memory before and after; `under_load` injects the same faults into
many concurrent streams.

The report counts faults injected and survived, requests lost and outputs that differ from the unfaulted run (both
must be 0), inputs fuzzed and how they were answered, server crashes (must be 0), the load held (streams, p50/p99
latency, errors) and the services' RSS growth over the load."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from specfleet.bench.under_load import SDK_BACKOFF_S, SDK_RETRIES, fault_actions, percentile_ms
from specfleet.state.embedded import free_port

READY_TIMEOUT_S = 240.0  # a 2-core machine starting six torch processes at once is slow
# the harness's clients retry as a patient real client does: a restarted router or Redis takes seconds to come back
BENCH_POOLS = ("python", "prose")


@dataclass
class ServiceProcess:
    """One `specfleet serve ROLE` process; restartable on the same port (so every address stays valid)."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    log: deque = field(default_factory=lambda: deque(maxlen=200))

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env)
        threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()

    def _drain(self, proc: subprocess.Popen) -> None:  # keeps the pipe from filling; the tail explains failures
        for line in proc.stdout:
            self.log.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mb(self) -> float | None:
        """Resident memory (Linux /proc), None where unavailable."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            return None
        return None


class ProcessFleet:
    """The fleet as `specfleet up` lays it out (drafter pools, verifiers, fusion when there are two pools or more,
    a router with the internal token), but every process is the caller's to kill, stop and restart: `up` itself
    stops the whole fleet when one service exits. Secrets travel in the environment, never in arguments."""

    def __init__(self, models_dir: Path, redis_url: str, pools: tuple[str, ...] = ("python", "prose"),
                 verifiers: int = 2, fusion: bool = True, token: str | None = None, slots: int = 32,
                 router_flags: tuple[str, ...] = ("--rpc-timeout", "3"), http: bool = False, prefix: str | None = None,
                 redis: PersistentRedis | None = None, routers: int = 1, grace_s: float = 5.0):
        # with `redis` (a PersistentRedis the caller started at redis_url) the faults include restarting it; routers:
        # replicas "router" (with the HTTP front), "router-1", ...; grace_s: every service's --grace
        self.redis_url, self.token, self.redis, self.grace_s = redis_url, token, redis, grace_s
        self.prefix = prefix or f"sfrel-{uuid.uuid4().hex[:8]}"
        internal = os.urandom(16).hex()
        base = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive",
                "SPECFLEET_REDIS_URL": redis_url}
        for name in ("SPECFLEET_TOKEN", "SPECFLEET_INTERNAL_TOKEN"):
            base.pop(name, None)
        common = ["--models", str(models_dir), "--key-prefix", self.prefix, "--slots", str(slots),
                  "--grace", f"{grace_s:g}"]
        serve = [sys.executable, "-m", "specfleet.cli", "serve"]
        inner_env = {**base, "SPECFLEET_TOKEN": internal}
        self.services: dict[str, ServiceProcess] = {}

        def add(name: str, args: list[str], env: dict) -> str:
            port = free_port()
            self.services[name] = ServiceProcess(name, [*serve, *args, "--port", str(port), *common], port, env)
            return f"127.0.0.1:{port}"

        drafters = {pool: add(f"drafter-{pool}", ["drafter", "--pool", pool], inner_env) for pool in pools}
        verifier_addresses = [add(f"verifier-{i}", ["verifier"], inner_env) for i in range(verifiers)]
        fusion_address = add("fusion", ["fusion"], inner_env) if fusion and len(pools) > 1 else ""
        self.http_port = free_port() if http else -1
        router_env = {**base, "SPECFLEET_INTERNAL_TOKEN": internal, **({"SPECFLEET_TOKEN": token} if token else {})}
        fleet_flags = ["--drafters", ",".join(f"{p}={a}" for p, a in drafters.items()),
                       "--verifiers", ",".join(verifier_addresses), "--fusion", fusion_address, *router_flags]
        self.router_address = add("router", ["router", *fleet_flags, "--http-port", str(self.http_port)], router_env)
        self.router_addresses = [self.router_address] + [add(f"router-{i}", ["router", *fleet_flags], router_env)
                                                         for i in range(1, routers)]
        self.verifier_addresses = verifier_addresses

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> ProcessFleet:
        for service in self.services.values():
            service.start()
        self.wait_ready(list(self.services))
        return self

    def wait_ready(self, names: list[str], timeout: float = READY_TIMEOUT_S) -> None:
        """Until every named service's health check answers SERVING; raises with the log tail of one that died."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        waiting = list(names)
        while waiting:
            name = waiting[0]
            service = self.services[name]
            if not service.alive():
                raise RuntimeError(f"{name} exited with {service.proc.returncode}:\n{''.join(service.log)}")
            with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        waiting.pop(0)
                        continue
                except grpc.RpcError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} was not SERVING within {timeout:.0f}s:\n{''.join(service.log)}")
            time.sleep(0.2)
        if self.http_port > 0 and "router" in names:
            self._wait_http(deadline)

    def _wait_http(self, deadline: float) -> None:
        import httpx

        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.http_url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the router's HTTP front on {self.http_url} did not answer")

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.services[name].pid, sig)
        if sig == signal.SIGKILL:
            self.services[name].proc.wait(30)

    def restart(self, name: str) -> None:
        """Starts a fresh process on the service's port (killing the old one if it still runs) and waits for it."""
        service = self.services[name]
        if service.alive():
            os.kill(service.pid, signal.SIGCONT)
            self.signal(name, signal.SIGKILL)
        service.start()
        self.wait_ready([name])

    def crashed(self) -> list[str]:
        """Services that exited on their own (none was killed here since its last start)."""
        return [name for name, s in self.services.items() if not s.alive()]

    def rss_mb(self) -> dict[str, float | None]:
        return {name: s.rss_mb() for name, s in self.services.items()}

    def stop(self) -> None:
        for service in self.services.values():
            if service.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(service.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                    service.proc.send_signal(signal.SIGTERM)
        for service in self.services.values():
            if service.proc is None:
                continue
            try:
                service.proc.wait(20)
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait(10)
        purge(self.redis_url, self.prefix)

    def __enter__(self) -> ProcessFleet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


class PersistentRedis:
    """A redis-server of the harness's own, on a loopback port, with persistence on (append-only file, fsync on every
    write) in a temp dir: `restart()` stops it with SIGTERM and starts it again on the same port and dir, so the
    fleet's state survives and every address stays valid; `stop()` leaves it down until `start()`."""

    def __init__(self, port: int = 0, workdir: str | None = None):
        import tempfile

        self.port = port or free_port()
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="specfleet-redis-aof-")
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> PersistentRedis:
        from specfleet.state.embedded import _wait_ready, redis_server_executable

        config = Path(self.workdir) / "redis.conf"
        config.write_text("\n".join([
            "bind 127.0.0.1", f"port {self.port}", "protected-mode yes", f'dir "{self.workdir}"',
            f'logfile "{Path(self.workdir) / "redis.log"}"', 'save ""', "appendonly yes", "appendfsync always",
            "daemonize no"]) + "\n")
        self.proc = subprocess.Popen([redis_server_executable(), str(config)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not _wait_ready(self.proc, "127.0.0.1", self.port, None, timeout):
            log = (Path(self.workdir) / "redis.log")
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            self.stop()
            raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}:\n{tail}")
        return self

    def stop(self) -> None:
        """SIGTERM (Redis flushes its append-only file and exits), SIGKILL if it does not within 10 s."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()
        self.restarts += 1

    def close(self) -> None:
        import shutil

        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PersistentRedis:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


def purge(redis_url: str, prefix: str) -> None:
    from specfleet.bench.fleet_bench import delete_prefix

    delete_prefix(redis_url, prefix)


def bench_slots(streams: int) -> int:
    """KV slots per verifier for `streams` concurrent streams: every live request keeps its KV cache on its verifier
    (fewer slots than streams thrash the caches)."""
    return max(32, streams // 2 + 12)


def bench_fleet(models_dir: Path, redis: PersistentRedis | None, redis_url: str, token: str, streams: int,
                rpc_timeout: float, http: bool = False, routers: int = 1) -> ProcessFleet:
    """The benchmarks' fleet (not started): drafter pools python and prose, fusion, two verifiers, a router with a
    bearer token and adaptive control off (every round drafts with both pools, so fusion is on every round's path),
    on `redis` (a PersistentRedis the caller started, so restarting it is one of the faults) or else `redis_url`."""
    return ProcessFleet(models_dir, redis.url if redis is not None else redis_url, pools=BENCH_POOLS, verifiers=2,
                        token=token, http=http, slots=bench_slots(streams),
                        router_flags=("--rpc-timeout", str(rpc_timeout), "--no-adaptive"), redis=redis,
                        routers=routers)


def bench_prompts(models_dir: Path, limit: int = 12, prompt_tokens: int = 48) -> list[list[int]]:
    """Token ids of the held-out prompts the benchmarks send (round-robin over domains)."""
    from transformers import AutoTokenizer

    from specfleet.bench.engine_bench import load_prompts

    tok = AutoTokenizer.from_pretrained(str(models_dir / "target"))
    return [p.ids for p in load_prompts(tok, None, limit, prompt_tokens)]


# ---------------------------------------------------------------- faults

@dataclass
class FaultRun:
    """One stream with a fault injected after its first tokens arrived."""

    fault: str
    tokens: list[int]
    text: str
    offsets: list[int]  # each chunk's offset: consecutive, so no token was missing or repeated
    injected_at: int  # tokens the client had when the fault was injected (-1: never, the stream ended first)
    seconds: float
    error: str = ""

    @property
    def exactly_once(self) -> bool:
        return self.offsets == sorted(self.offsets) and len(set(self.offsets)) == len(self.offsets)


def stream_with_fault(address: str, ids: list[int], new_tokens: int, fault: str = "none", inject=None,
                      token: str | None = None, after_tokens: int = 1, timeout: float = 120.0,
                      request_id: str | None = None) -> FaultRun:
    """Streams one greedy request through the SDK (retries resume by request id) and calls `inject()` once the
    client holds `after_tokens` tokens and the stream is not finished; SDK errors are recorded, not raised."""
    from specfleet.sdk import Client, SpecfleetError

    tokens, texts, offsets, injected_at = [], [], [], -1
    start = time.perf_counter()
    error = ""
    with Client(address, token=token, timeout=timeout, retries=SDK_RETRIES, backoff=SDK_BACKOFF_S) as client:
        try:
            for chunk in client.generate(prompt_token_ids=ids, max_new_tokens=new_tokens, request_id=request_id):
                if chunk.token_ids:
                    offsets.append(chunk.offset)
                tokens += chunk.token_ids
                texts.append(chunk.text)
                if inject is not None and injected_at < 0 and len(tokens) >= after_tokens and not chunk.finished:
                    injected_at = len(tokens)
                    inject()
        except SpecfleetError as exc:
            error = str(exc)
    return FaultRun(fault, tokens, "".join(texts), offsets, injected_at, time.perf_counter() - start, error)


def request_id_for(fleet: ProcessFleet, verifier: str) -> str:
    """A fresh request id whose rounds the router sends to `verifier` first (it picks verifiers by a hash of the id,
    sorted by address), so the fault hits the verifier serving the stream."""
    import zlib

    ordered = sorted(fleet.verifier_addresses)
    wanted = ordered.index(f"127.0.0.1:{fleet.services[verifier].port}")
    while True:
        rid = f"rel-{uuid.uuid4().hex}"
        if zlib.crc32(rid.encode()) % len(ordered) == wanted:
            return rid


def run_fault(fleet: ProcessFleet, name: str, ids: list[int], new_tokens: int) -> FaultRun:
    """One stream with the named fault (see fault_actions) injected mid-stream, then the fleet made whole again."""
    inject, recover = fault_actions(fleet)[name]
    verifier = next((v for v in ("verifier-0", "verifier-1") if name.endswith(v)), None)
    rid = request_id_for(fleet, verifier) if verifier else None
    try:
        return stream_with_fault(fleet.router_address, ids, new_tokens, name, inject, fleet.token, request_id=rid)
    finally:
        recover()


# ---------------------------------------------------------------- bad input

# (field, bad value, what the router's message must say): one field of an otherwise valid request made wrong
BAD_FIELDS = (
    ("prompt", "", "the prompt is empty"),
    ("prompt_token_ids", [-1], "prompt_token_ids must be in"),
    ("prompt_token_ids", [2**31 - 1], "prompt_token_ids must be in"),
    ("prompt_token_ids", [5] * 1100, "exceeds the model's context"),
    ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
    ("max_new_tokens", -7, "max_new_tokens must be >= 1"),
    ("max_new_tokens", 2**31 - 1, "exceeds the model's context"),
    ("temperature", math.nan, "temperature must be"),
    ("temperature", -0.5, "temperature must be"),
    ("temperature", math.inf, "temperature must be"),
    ("temperature", 1e-30, "temperature must be"),
    ("top_p", -0.1, "top_p must be in (0, 1]"),
    ("top_p", 1.5, "top_p must be in (0, 1]"),
    ("top_p", math.nan, "top_p must be in (0, 1]"),
    ("top_k", -3, "top_k must be"),
    ("drafters", ["no-such-pool"], "unknown drafter pool"),
    ("request_id", "x" * 300, "request_id is longer"),
    ("request_id", "has white space", "bad request id"),
    ("stop", ["s"] * 100, "stop takes at most"),
)
# HTTP bodies (beside a valid prompt) and the status each must get
BAD_BODIES = (
    ({"max_tokens": -1}, 400), ({"max_tokens": "ten"}, 400), ({"max_tokens": 2**40}, 400),
    ({"max_tokens": 5000}, 400), ({"temperature": "hot"}, 400), ({"temperature": -1}, 400),
    ({"top_p": 0}, 400), ({"top_p": 2}, 400), ({"seed": 2**70}, 400), ({"model": "gpt-99"}, 404),
    ({"prompt": [2**40]}, 400), ({"prompt": [-4, 5]}, 400), ({"prompt": ""}, 400), ({"prompt": None}, 400),
    ({"prompt": {"a": 1}}, 400), ({"n": 3}, 400), ({"stop": [1, 2]}, 400), ({"stream": "yes"}, 400),
    ({"logit_bias": {"1": 5}}, 400), ({"prompt": ["a", "b"]}, 400),
    ({"prompt": "\ud800"}, 400), ({"stop": ["\udfff"]}, 400),  # lone surrogates (json.dumps escapes them)
)
BAD_BYTES = (b"\xff\xfe not protobuf", b"\x12\x04\xff\xfe\xfd\xfc", b"\x0a\xff\xff\xff\xff\x0f", b"\x20")


def fuzz(fleet: ProcessFleet, seed: int, rounds: int) -> dict:
    """Sends every bad field, body and byte string (and `rounds` random mixes of two bad fields) to the router
    process; counts answers that were not INVALID_ARGUMENT / the expected HTTP status, then checks that every
    service is alive and the router still answers a valid request."""
    import grpc
    import httpx

    from specfleet.api.v1 import router_pb2, router_pb2_grpc

    rng = random.Random(seed)
    metadata = (("authorization", f"Bearer {fleet.token}"),) if fleet.token else ()
    cases = [[case] for case in BAD_FIELDS] + [rng.sample(BAD_FIELDS, 2) for _ in range(rounds)]
    wrong: list[str] = []
    with grpc.insecure_channel(fleet.router_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for case in cases:
            fields = {"prompt_token_ids": [5, 6, 7], "max_new_tokens": 2}
            for name, value, _ in case:
                fields[name] = value
                if name == "prompt":
                    fields.pop("prompt_token_ids")
            try:
                stub.Complete(router_pb2.GenerateRequest(**fields), timeout=60, metadata=metadata)
                wrong.append(f"{case}: accepted")
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or not any(f in exc.details() for *_, f in case):
                    wrong.append(f"{[c[:2] for c in case]}: {exc.code().name} {exc.details()}")
        raw = channel.unary_unary("/specfleet.api.v1.Router/Complete")  # identity serializers: bytes as they are
        for data in BAD_BYTES:
            try:
                raw(data, timeout=30, metadata=metadata)
                wrong.append(f"{data!r}: accepted")
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    wrong.append(f"{data!r}: {exc.code().name} {exc.details()}")
    http_cases = 0
    if fleet.http_port > 0:
        headers = {"Authorization": f"Bearer {fleet.token}"} if fleet.token else {}
        bodies = [(json.dumps({"prompt": "def f(x):", "max_tokens": 2, **b}).encode(), s) for b, s in BAD_BODIES]
        bodies += [(b"{not json", 400), (b"\xff\xfe", 400), (b"[" * 200_000, 400), (b"x" * (2 << 20), 413)]
        for data, status in bodies:
            reply = httpx.post(f"{fleet.http_url}/v1/completions", content=data, headers=headers, timeout=60)
            if reply.status_code != status or not reply.json().get("error", {}).get("message"):
                wrong.append(f"HTTP {data[:60]!r}: {reply.status_code} {reply.text[:200]}")
        http_cases = len(bodies)
    crashed = fleet.crashed()
    valid = stream_with_fault(fleet.router_address, [5, 6, 7], 4, token=fleet.token)
    return {"grpc_requests": len(cases), "malformed_protobuf": len(BAD_BYTES), "http_bodies": http_cases,
            "inputs_fuzzed": len(cases) + len(BAD_BYTES) + http_cases, "wrong_answers": len(wrong),
            "wrong_examples": wrong[:5], "server_crashes": len(crashed), "crashed": crashed,
            "valid_request_after": not valid.error and len(valid.tokens) > 0}


# ---------------------------------------------------------------- load

def load_run(fleet: ProcessFleet, prompts: list[list[int]], expected: list[list[int]], streams: int, seconds: float,
             new_tokens: int) -> dict:
    """`streams` concurrent SDK clients (retries resume by request id, as real clients do), each sending greedy
    requests back to back until `seconds` are up (requests in flight then finish): latency per request, errors
    (calls that failed after the SDK's retries), the retries of the calls that succeeded (each resumed by request
    id), and outputs that differ from the unloaded run."""
    import asyncio

    from specfleet.sdk import AsyncClient, SpecfleetError

    latencies: list[float] = []
    errors: list[str] = []
    differing = retries = 0

    async def client(i: int, sdk, deadline: float) -> None:
        nonlocal differing, retries
        n = i
        while time.monotonic() < deadline:
            which = n % len(prompts)
            n += streams
            start = time.perf_counter()
            try:
                reply = await sdk.complete(prompt_token_ids=prompts[which], max_new_tokens=new_tokens)
            except SpecfleetError as exc:
                errors.append(str(exc))
                continue
            latencies.append(time.perf_counter() - start)
            retries += reply.attempts - 1
            differing += list(reply.token_ids) != expected[which]

    async def main() -> float:
        async with AsyncClient(fleet.router_address, token=fleet.token, timeout=600) as sdk:
            start = time.monotonic()
            await asyncio.gather(*(client(i, sdk, start + seconds) for i in range(streams)))
            return time.monotonic() - start

    wall = asyncio.run(main())
    ordered = sorted(latencies)
    return {"streams": streams, "seconds": round(wall, 1), "requests": len(latencies) + len(errors),
            "completed": len(latencies), "errors": len(errors), "error_examples": errors[:3],
            "retries": retries,
            "outputs_differing": differing, "tokens_per_s": round(len(latencies) * new_tokens / wall, 1),
            "latency_ms": {"p50": percentile_ms(ordered, 0.5), "p99": percentile_ms(ordered, 0.99)}}


# ---------------------------------------------------------------- the benchmark

DEFAULT_STAGES = ("faults", "bad-input", "cancel", "load")
# `--under-load`: the load once per fault, minutes each; rolling: every service replaced under long streams (two
# routers), minutes each
STAGES = (*DEFAULT_STAGES, "faults-under-load", "rolling")


def run(models_dir: Path, redis_url: str, output: Path, streams: int = 200, seconds: float = 60.0,
        new_tokens: int = 96, load_tokens: int = 16, fuzz_rounds: int = 40, seed: int = 0, rpc_timeout: float = 30.0,
        progress: bool = True, own_redis: bool = True, stages: tuple[str, ...] = DEFAULT_STAGES,
        deadline_s: float = 300.0, outage_s: float = 5.0, rolling_streams: int = 16,
        rolling_tokens: int = 256) -> dict:
    """The benchmark's `stages` (DEFAULT_STAGES by default) against one fleet. With own_redis (the default) the fleet
    runs on a redis-server of its own with persistence on, so the faults include restarting Redis mid-stream;
    redis_url is then unused. own_redis=False uses redis_url and skips that fault. After the faults, the faults
    under load and the load, the fleet's Redis is counted (`leaks.settled_census`). The report's keys of the stages
    run replace those in `output`; the others (stages not run now, `bench fuzz`'s) are kept. faults-under-load runs
    `streams` requests of `load_tokens` tokens at once, each with `deadline_s`, and restores a faulted service
    `outage_s` after the fault (see `under_load`). rolling starts the fleet with two routers and replaces every
    service in turn under `rolling_streams` streams of `rolling_tokens` tokens (see `rolling`)."""
    from specfleet.bench.leaks import cancellation_run, settled_census

    unknown = set(stages) - set(STAGES)
    if unknown or not stages:
        raise ValueError(f"stages are {', '.join(STAGES)}; got {', '.join(stages) or 'none'}")

    def say(text: str) -> None:
        if progress:
            print(f"[bench reliability] {text}", file=sys.stderr, flush=True)

    prompts = bench_prompts(models_dir)
    token = os.urandom(12).hex()
    say("starting the fleet: drafters python, prose; fusion; 2 verifiers; router (one process each)")
    # the router's default 30 s deadline: a verifier round under 200 streams on 2 cores takes ~10 s, and a round that
    # times out is verified again elsewhere (10 s measured: every request failed, the load doubled by failovers)
    slots = bench_slots(streams)
    report: dict = {}
    redis_counts: dict = {}
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(PersistentRedis()) if own_redis else None
        redis_url = redis.url if redis is not None else redis_url
        fleet = stack.enter_context(bench_fleet(models_dir, redis, redis_url, token, max(streams, rolling_streams),
                                                rpc_timeout, http=True, routers=2 if "rolling" in stages else 1))
        if "faults" in stages:
            names = list(fault_actions(fleet))
            say(f"unfaulted runs of {len(prompts)} prompts")
            baseline = [stream_with_fault(fleet.router_address, ids, new_tokens, token=token).tokens
                        for ids in prompts]
            faults = []
            for i, name in enumerate(names):
                say(f"fault {i + 1}/{len(names)}: {name}")
                r = run_fault(fleet, name, prompts[i % len(prompts)], new_tokens)
                want = baseline[i % len(prompts)]
                faults.append({"fault": name, "injected_after_tokens": r.injected_at, "seconds": round(r.seconds, 2),
                               "completed": not r.error and len(r.tokens) == len(want),
                               "identical": r.tokens == want, "error": r.error})
            report["faults"] = {
                "injected": len(faults), "survived": sum(f["completed"] and f["identical"] for f in faults),
                "requests_lost": sum(not f["completed"] for f in faults),
                "outputs_differing_from_unfaulted": sum(f["completed"] and not f["identical"] for f in faults),
                "runs": faults}
            redis_counts["after_faults"] = settled_census(redis_url, fleet.prefix)
        if "faults-under-load" in stages:
            from specfleet.bench.under_load import faults_under_load

            report["faults_under_load"] = faults_under_load(fleet, prompts, streams, load_tokens, deadline_s,
                                                            outage_s, seed, say=say)
            redis_counts["after_faults_under_load"] = settled_census(redis_url, fleet.prefix)
        if "rolling" in stages:
            from specfleet.bench.rolling import rolling_update

            report["rolling_update"] = rolling_update(fleet, prompts, rolling_streams, rolling_tokens, deadline_s,
                                                      seed, say=say)
            redis_counts["after_rolling_update"] = settled_census(redis_url, fleet.prefix)
        if "bad-input" in stages:
            say("fuzzing the gRPC and HTTP APIs")
            report["bad_input"] = fuzz(fleet, seed, fuzz_rounds)
        if "cancel" in stages:
            say("cancellation: long streams whose clients go away")
            report["cancellation"] = cancellation_run(fleet.router_address, redis_url, fleet.prefix, token)
            redis_counts["after_cancellation"] = settled_census(redis_url, fleet.prefix)
        if "load" in stages:
            load_baseline = [stream_with_fault(fleet.router_address, ids, load_tokens, token=token).tokens
                             for ids in prompts]
            rss_before = fleet.rss_mb()
            say(f"load: {streams} concurrent streams for {seconds:.0f} s")
            report["load"] = load_run(fleet, prompts, load_baseline, streams, seconds, load_tokens)
            rss_after = fleet.rss_mb()
            growth = {n: round(rss_after[n] - rss_before[n], 1) for n in rss_before
                      if rss_before[n] is not None and rss_after.get(n) is not None}
            report["memory_mb"] = {"before_load": rss_before, "after_load": rss_after, "growth": growth,
                                   "max_growth": max(growth.values(), default=0.0)}
            redis_counts["after_load"] = settled_census(redis_url, fleet.prefix)
        crashed = fleet.crashed()
    report["config"] = {
        "fleet": "one `specfleet serve` process per service on loopback, SDK clients with retries",
        "pools": list(BENCH_POOLS), "verifiers": 2, "fusion": True, "routers": len(fleet.router_addresses),
        "grace_s": fleet.grace_s, "max_new_tokens": new_tokens,
        "load_max_new_tokens": load_tokens, "router_rpc_timeout_s": rpc_timeout, "slots": slots,
        "cpu_count": os.cpu_count(), "stages": list(stages),
        "redis": ("own redis-server (appendonly yes, appendfsync always)" if own_redis else redis_url)}
    report["server_crashes"] = len(crashed) + report.get("bad_input", {}).get("server_crashes", 0)
    if redis_counts:
        report["redis"] = redis_counts
    output.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(output.read_text()) if output.exists() else {}
    if "redis" in previous and "redis" in report:  # counts after stages not run now stay
        report["redis"] = {**previous["redis"], **report["redis"]}
    output.write_text(json.dumps({**previous, **report}, indent=2) + "\n")
    return report


def format_table(report: dict) -> str:
    lines = []
    if "faults" in report:
        f = report["faults"]
        lines.append(f"faults injected {f['injected']}, survived {f['survived']}, requests lost {f['requests_lost']}, "
                     f"outputs differing from the unfaulted run {f['outputs_differing_from_unfaulted']}")
        lines += [f"  {r['fault']:<26} after {r['injected_after_tokens']:>3} tokens  {r['seconds']:>6.2f} s  "
                  f"{'identical' if r['identical'] else 'DIFFERENT'}{'  ' + r['error'] if r['error'] else ''}"
                  for r in f["runs"]]
    if "faults_under_load" in report:
        from specfleet.bench.under_load import format_table as under_load_table

        lines += under_load_table(report["faults_under_load"])
    if "rolling_update" in report:
        from specfleet.bench.rolling import format_table as rolling_table

        lines += rolling_table(report["rolling_update"])
    if "bad_input" in report:
        b = report["bad_input"]
        lines.append(f"inputs fuzzed {b['inputs_fuzzed']} (gRPC {b['grpc_requests']}, malformed protobuf "
                     f"{b['malformed_protobuf']}, HTTP {b['http_bodies']}): wrong answers {b['wrong_answers']}")
    if "cancellation" in report:
        c = report["cancellation"]
        lines.append(f"cancellation: {c['requests']} streams left by their clients, work stopped within "
                     f"{c['bound_s']:g} s for {c['within_bound']}, latest {c['work_stopped_after_s_max']} s")
    if "load" in report:
        load, mem = report["load"], report["memory_mb"]
        lines.append(f"load: {load['streams']} streams for {load['seconds']} s: {load['completed']} requests, "
                     f"{load['errors']} errors, {load.get('retries', 0)} retries, {load['outputs_differing']} "
                     f"differing, p50 {load['latency_ms']['p50']} ms, "
                     f"p99 {load['latency_ms']['p99']} ms, {load['tokens_per_s']} tok/s")
        growth = ", ".join(f"{name} {mb:+.1f}" for name, mb in mem["growth"].items())
        lines.append(f"memory growth over the load (MB RSS): {growth}")
    for when, found in report.get("redis", {}).items():
        kinds = ", ".join(f"{k} {n}" for k, n in found["by_kind"].items())
        lines.append(f"redis {when.replace('_', ' ')}: {found['keys']} keys ({kinds}), requests {found['requests']}, "
                     f"orphans {found['orphans']}, verify stream pending {found['verify_pending']} waiting "
                     f"{found['verify_undelivered']}")
    lines.append(f"server crashes {report['server_crashes']}")
    return "\n".join(lines)
