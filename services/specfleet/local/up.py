"""`specfleet up`: the whole fleet as local processes on 127.0.0.1, with one log view, an embedded Redis when none is
given, throwaway mTLS certificates on request, the local autoscaler, and a clean stop on Ctrl-C. The command's
arguments are declared in `specfleet.cli.up`; this module does the work."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from specfleet.drafter.serve import HEAD_POOL, MODEL_FREE_POOLS
from specfleet.engine.models import ModelSet, check_all
from specfleet.runtime.security import (
    INTERNAL_TOKEN_ENV,
    INTERNAL_TOKEN_FILE_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    ChannelTls,
    resolve_tokens,
)
from specfleet.state.embedded import free_port

_SECRET_ENV = (TOKEN_ENV, INTERNAL_TOKEN_ENV, TOKEN_FILE_ENV, INTERNAL_TOKEN_FILE_ENV)


def child_command(role_args: list[str], port: int, common: list[str]) -> list[str]:
    """The argv `up` starts a service with: never a secret (argv is readable by every local user, e.g. in `ps`)."""
    return [sys.executable, "-m", "specfleet.cli", "serve", *role_args, "--port", str(port), *common]


def child_env(env: dict[str, str], token: str | None = None, internal_token: str | None = None) -> dict[str, str]:
    """`env` carrying exactly the tokens a service needs (SPECFLEET_TOKEN: the one its callers must send;
    SPECFLEET_INTERNAL_TOKEN: the router's to internal services), none inherited from `up`'s own environment: a
    public token there must not become an internal service's."""
    out = {k: v for k, v in env.items() if k not in _SECRET_ENV}
    if token:
        out[TOKEN_ENV] = token
    if internal_token:
        out[INTERNAL_TOKEN_ENV] = internal_token
    return out


def tracing_args(args) -> list[str]:
    """The tracing flags `up` passes on to each service it starts."""
    return ([f"--otlp-endpoint={args.otlp_endpoint}"] if args.otlp_endpoint else []) + (
        ["--trace-console"] if args.trace_console else [])


TAIL_LINES = 20  # a child's last log lines, printed when it exits unasked


class _Logs:
    """The children's output on one stream, each line prefixed by its child's name; the last TAIL_LINES of each
    are kept to show why a child exited."""

    def __init__(self, out):
        self.out = out
        self.tails: dict[str, deque[str]] = {}
        self.readers: dict[str, threading.Thread] = {}

    def follow(self, name: str, stream) -> None:
        tail = self.tails[name] = deque(maxlen=TAIL_LINES)

        def pipe() -> None:
            for line in iter(stream.readline, ""):
                tail.append(line)
                self.out.write(f"{name:>16} | {line}")
                self.out.flush()

        self.readers[name] = reader = threading.Thread(target=pipe, name=f"log-{name}", daemon=True)
        reader.start()

    def last_lines(self, name: str) -> str:
        """The child's last lines, once its output has ended (it has exited)."""
        reader = self.readers.get(name)
        if reader is not None:
            reader.join(timeout=5)  # its last lines may still be in the pipe
        return "".join(f"  {line}" for line in self.tails.get(name, ())) or "  (it printed nothing)\n"


class ChildExited(Exception):
    """A child service exited without being asked to."""

    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


def _report_exits(replicas, logs: _Logs, when: str) -> None:
    """Each child that exited unasked: its name, exit code and last lines."""
    failed = set(replicas.failed())
    for name, proc in replicas.all():
        if name in failed:
            print(f"error: {name} exited with code {proc.returncode} {when}; its last lines:\n"
                  f"{logs.last_lines(name)}", end="", file=sys.stderr, flush=True)
    print("stopping the fleet", file=sys.stderr, flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@dataclass
class _Mtls:
    """--mtls: a throwaway CA's certificates for the internal services (server side) and the router (client side)."""

    certs_dir: str | None = None  # mode 0700; removed when the fleet stops
    inner: list[str] = field(default_factory=list)  # `serve` flags of an internal service
    router: list[str] = field(default_factory=list)  # `serve router` flags
    health: ChannelTls | None = None  # what `up`'s own health checks of internal services present


def _dev_mtls() -> _Mtls:
    """Internal services accept only the router's client certificate (and the internal token)."""
    from specfleet.runtime.security import write_dev_certs

    certs_dir = tempfile.mkdtemp(prefix="specfleet-certs-")
    try:
        certs = {k: str(v) for k, v in write_dev_certs(certs_dir, days=7).items()}
    except ValueError as exc:
        shutil.rmtree(certs_dir, ignore_errors=True)
        sys.exit(f"error: --mtls: {exc}")
    return _Mtls(certs_dir,
                 ["--tls-cert", certs["server"], "--tls-key", certs["server_key"], "--tls-client-ca", certs["ca"]],
                 ["--internal-tls-ca", certs["ca"], "--internal-tls-cert", certs["client"],
                  "--internal-tls-key", certs["client_key"]],
                 ChannelTls.from_files(certs["ca"], certs["client"], certs["client_key"]))


@dataclass
class _Plan:
    """Every process `up` starts first: (name, `serve` arguments, port, tokens passed by environment)."""

    services: list[tuple[str, list[str], int, dict]] = field(default_factory=list)
    fusion: str = ""  # the fusion service's address ("" without one)


def _plan(args, pools: list[str], mtls: _Mtls, public: list[str], internal_token: str) -> _Plan:
    plan = _Plan()
    internal_secrets = {"token": internal_token}
    drafters = {}
    for pool in pools:
        port = free_port()
        drafters[pool] = f"127.0.0.1:{port}"
        plan.services.append((f"drafter-{pool}", ["drafter", "--pool", pool, *mtls.inner], port, internal_secrets))
    verifiers = []
    for i in range(args.verifiers):
        port = free_port()
        verifiers.append(f"127.0.0.1:{port}")
        plan.services.append((f"verifier-{i}", ["verifier", *mtls.inner], port, internal_secrets))
    if len(pools) > 1 and args.fusion:
        port = free_port()
        plan.fusion = f"127.0.0.1:{port}"
        plan.services.append(("fusion", ["fusion", *mtls.inner], port, internal_secrets))
    router = ["router", "--drafters", ",".join(f"{p}={a}" for p, a in drafters.items()),
              "--verifiers", ",".join(verifiers), "--fusion", plan.fusion, "--k", str(args.k)] + (
              [] if args.adaptive else ["--no-adaptive"]) + (
              [] if args.pipeline else ["--no-pipeline"]) + ([] if args.routing else ["--no-routing"]) + (
              ["--verify-queue", args.verify_queue] + ([] if args.dsi else ["--no-dsi"])) + mtls.router
    # the router accepts every public token (one per caller, each rate-limited on its own)
    router_secrets = {"token": public[0] if len(public) == 1 else None, "internal_token": internal_token}
    if len(public) > 1:
        router += ["--token-file", str(args.token_file or os.environ[TOKEN_FILE_ENV])]  # a path, not a secret
    router += [f"--rate-limit-rps={args.rate_limit_rps:g}", f"--rate-limit-tpm={args.rate_limit_tpm:g}"]
    plan.services.append(("router", router, args.grpc_port, router_secrets))
    return plan


def _wait_all_healthy(plan: _Plan, timeout: float, health_tls: ChannelTls | None, failed) -> None:
    """Every service, not only the router: a first request must find them all up. `failed()` names the children
    that exited; the wait ends at once with ChildExited when one does (a child that cannot start never will)."""
    from specfleet.runtime.server import wait_healthy

    async def all_healthy():
        health = asyncio.gather(*(wait_healthy(f"127.0.0.1:{port}", timeout=timeout,
                                               tls=None if name == "router" else health_tls)
                                  for name, _, port, _ in plan.services))
        while not health.done():
            exited = failed()
            if exited:
                health.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await health
                raise ChildExited(exited)
            await asyncio.wait([health], timeout=0.2)
        health.result()

    asyncio.run(all_healthy())


def _start_http(args, public: list[str]):
    """The OpenAI-compatible front, in this process: ((server, thread), its note for the ready line)."""
    from specfleet.runtime.telemetry import configure_tracing

    configure_tracing("specfleet-http", args.otlp_endpoint, args.trace_console)  # the front runs here
    from specfleet.router.http import build_app, start_http_in_thread

    app = build_app(f"127.0.0.1:{args.grpc_port}", public[0] if len(public) == 1 else None, args.served_model_name)
    server, thread, http_port = start_http_in_thread(app, "127.0.0.1", args.http_port)
    return (server, thread), f", OpenAI-compatible HTTP on http://127.0.0.1:{http_port}/v1"


def _stop_children(children: list[subprocess.Popen], grace: float) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=grace + 10)
        except subprocess.TimeoutExpired:
            child.kill()


def kv_args(args) -> list[str]:
    """The --kv-cache-memory / --max-model-len options again, for a child process."""
    return ["--kv-cache-memory", str(args.kv_cache_memory),
            *(["--max-model-len", str(args.max_model_len)] if args.max_model_len else [])]


def run(args) -> int:
    # Ctrl-C and SIGTERM both stop the fleet cleanly, even where SIGINT arrived ignored (background jobs)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    pools = [p.strip().removeprefix("drafter-") for p in (args.pools or "").split(",") if p.strip()]
    try:
        # --device auto is resolved here: every process is handed the one device (`ModelSet.args`)
        models = ModelSet.bundled(args.models).with_overrides(args.target, args.drafter, args.dtype,
                                                              getattr(args, "head", None),
                                                              getattr(args, "device", None))
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    if HEAD_POOL in pools and models.head is None:
        sys.exit(f"error: drafter pool {HEAD_POOL} needs a draft head for the target: train one with `specfleet "
                 "train head` (it lands in MODELS/head) or give --head PATH")
    known = tuple(models.drafters) + MODEL_FREE_POOLS + ((HEAD_POOL,) if models.head is not None else ())
    unknown = [p for p in pools if p not in known]
    if unknown:
        sys.exit(f"error: unknown drafter pool(s) {', '.join(unknown)}; choose from {', '.join(known)} "
                 "(--drafter NAME=PATH adds a drafter)")
    try:  # every model is checked before anything starts: a bad one fails here, not after the ready timeout
        check_all(models, [p for p in pools if p not in MODEL_FREE_POOLS + (HEAD_POOL,)])
        if not (models.target / "config.json").exists():
            raise ValueError(f"no target model at {models.target} (expected a Hugging Face folder with config.json)")
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    try:
        public = resolve_tokens(args.token, args.token_file, "--token", TOKEN_ENV, TOKEN_FILE_ENV)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    internal_token = os.urandom(16).hex()  # internal services accept only the router (and each other)
    internal_secrets = {"token": internal_token}
    mtls = _dev_mtls() if args.mtls else _Mtls()
    embedded = None
    redis_url = args.redis_url
    if not redis_url:
        from specfleet.state import start_embedded_redis

        embedded = start_embedded_redis()
        redis_url = embedded.url
        print(f"embedded Redis on {redis_url}", flush=True)
    common = ["--models", str(args.models), *models.args(), *kv_args(args), "--redis-url", redis_url,
              "--key-prefix", args.key_prefix,
              "--slots", str(args.slots), *tracing_args(args)]
    plan = _plan(args, pools, mtls, public, internal_token)
    http = None
    autoscaler_stop = None
    logs = _Logs(sys.stdout)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}

    def spawn(name: str, role_args: list[str], port: int, secrets: dict) -> subprocess.Popen:
        cmd = child_command(role_args, port, common)
        # the heartbeat id the autoscaler knows it by; tokens by environment, never in argv
        environment = child_env({**env, "SPECFLEET_POD_NAME": name}, **secrets)
        if not name.startswith("verifier"):
            # small models: one thread each, idle threads sleeping instead of spinning, so the verifier keeps
            # the cores (measured: 2.4x the fleet's throughput at concurrency 32 on 2 cores)
            environment.setdefault("OMP_NUM_THREADS", "1")
            environment.setdefault("OMP_WAIT_POLICY", "passive")
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
        logs.follow(name, child.stdout)
        return child

    from specfleet.local.autoscale import LocalReplicas, role_args

    replicas = LocalReplicas(lambda role, pod: spawn(pod, role_args(role) + mtls.inner, free_port(),
                                                     internal_secrets),
                             grace_s=args.grace)
    try:
        for name, role_cmd, port, secrets in plan.services:
            role = "verifier" if name.startswith("verifier-") else name
            replicas.add(role, name, spawn(name, role_cmd, port, secrets))
        started = time.monotonic()
        _wait_all_healthy(plan, args.ready_timeout, mtls.health, replicas.failed)
        http_note = ""
        if args.http_port >= 0:
            http, http_note = _start_http(args, public)
        print(f"specfleet is up in {time.monotonic() - started:.1f}s: router gRPC on 127.0.0.1:{args.grpc_port}"
              f"{http_note} ({len(pools)} drafter pools, {args.verifiers} verifier(s)); Ctrl-C stops it.\n"
              f"  try: specfleet client generate 'def main():' --target 127.0.0.1:{args.grpc_port}", flush=True)
        if args.exit_when_ready:
            return 0
        if args.autoscale:
            from specfleet.local.autoscale import local_spec, start_autoscaler

            spec = local_spec(pools, args.verifiers, args.max_verifiers, args.max_drafters, args.autoscale_interval,
                              fusion=bool(plan.fusion))
            _, autoscaler_stop = start_autoscaler(replicas, redis_url, args.key_prefix, spec, args.autoscale_interval,
                                                  lambda line: print(f"{'autoscale':>16} | {line}", flush=True))
            print(f"autoscaling: verifiers 1-{max(args.verifiers, args.max_verifiers)}, each drafter pool "
                  f"1-{args.max_drafters}, a step every {args.autoscale_interval:g}s", flush=True)
        while not replicas.failed():
            time.sleep(0.5)
        _report_exits(replicas, logs, "while the fleet was serving")
        return 1
    except ChildExited:
        _report_exits(replicas, logs, "during start-up")
        return 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean stop short
        print("\nstopping the fleet...", flush=True)
        return 0
    except TimeoutError as exc:
        print(f"error: {exc}; see the logs above", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if autoscaler_stop is not None:
            autoscaler_stop()
        if http is not None:
            from specfleet.runtime.telemetry import shutdown_tracing

            http[0].should_exit = True
            http[1].join(timeout=10)
            shutdown_tracing()
        _stop_children([child for _, child in replicas.all()], args.grace)
        if embedded is not None:
            embedded.stop()
        if mtls.certs_dir is not None:
            shutil.rmtree(mtls.certs_dir, ignore_errors=True)
