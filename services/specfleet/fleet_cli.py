"""`specfleet serve ROLE` (one service in this process) and `specfleet up` (the whole fleet as local processes with
one log view, an embedded Redis when none is given, and a clean stop on Ctrl-C)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from specfleet.fleet import DRAFTER_POOLS, MODEL_FREE_POOLS, ServeOptions
from specfleet.security import (
    INTERNAL_TOKEN_ENV,
    INTERNAL_TOKEN_FILE_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    ChannelTls,
    ServerTls,
    resolve_tokens,
)
from specfleet.state.embedded import free_port

ROLES = ("router", "drafter", "fusion", "verifier")


def _addresses(text: str | None) -> list[str]:
    return [a.strip() for a in (text or "").split(",") if a.strip()]


def _pools(text: str | None) -> dict[str, str]:
    """`python=127.0.0.1:5001,c=127.0.0.1:5002` -> {"python": "127.0.0.1:5001", ...}."""
    pools = {}
    for item in _addresses(text):
        name, _, address = item.partition("=")
        if not address:
            raise ValueError(f"--drafters wants POOL=HOST:PORT items, got {item!r}")
        pools[name] = address
    return pools


async def _serve(args) -> None:
    from specfleet import fleet
    from specfleet.telemetry import configure_tracing, shutdown_tracing

    # before any server or channel is made: they install their tracing interceptors when tracing is on
    configure_tracing(f"specfleet-{args.role}" + (f"-{args.pool}" if args.role == "drafter" else ""),
                      args.otlp_endpoint, args.trace_console)

    tokens = resolve_tokens(args.token, args.token_file, "--token", TOKEN_ENV, TOKEN_FILE_ENV)
    internal = resolve_tokens(args.internal_token, args.internal_token_file, "--internal-token", INTERNAL_TOKEN_ENV,
                              INTERNAL_TOKEN_FILE_ENV)
    tls = ServerTls.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
    if args.role == "router" and args.http_port >= 0 and tls is not None:
        raise ValueError("--http-port with --tls-cert is not supported (the HTTP front reaches its router in "
                         "plaintext); serve HTTP from a separate TLS-terminating proxy, or drop --tls-cert")
    opts = ServeOptions(args.models, args.redis_url, args.host, tokens or None, args.slots, args.key_prefix,
                        profile=args.profile, max_batch_latency_ms=args.max_batch_latency_ms,
                        max_batch_tokens=args.max_batch_tokens, tls=tls, rate_limit_rps=args.rate_limit_rps,
                        rate_limit_tpm=args.rate_limit_tpm,
                        health_port=None if args.health_port < 0 else args.health_port,
                        verify_intake=args.verify_intake)
    if args.role == "drafter":
        running, _ = await fleet.start_drafter(args.pool, opts, args.port)
    elif args.role == "fusion":
        running, _ = await fleet.start_fusion(opts, args.port)
    elif args.role == "verifier":
        running, _ = await fleet.start_verifier(opts, args.port)
    else:
        from specfleet.router.service import FleetConfig

        config = FleetConfig(drafters=_pools(args.drafters), verifiers=_addresses(args.verifiers),
                             fusion=args.fusion or None, k_max=args.k, adaptive=args.adaptive,
                             pipeline=args.pipeline, routing=args.routing, rpc_timeout_s=args.rpc_timeout,
                             verify_queue=args.verify_queue, dsi=args.dsi,
                             max_queue_wait_ms=args.max_queue_wait_ms)
        internal_tls = ChannelTls.from_files(args.internal_tls_ca, args.internal_tls_cert, args.internal_tls_key,
                                             args.internal_tls_server_name)
        running, _ = await fleet.start_router(opts, config, args.port, internal[0] if internal else None,
                                              internal_tls)
    http = None
    if args.role == "router" and args.http_port >= 0:
        from specfleet.router.http import build_app, start_http_in_thread

        # the HTTP front calls this process's gRPC router over loopback, with the public token; with several
        # tokens it passes each caller's own on (the router checks it and rate-limits per token)
        app = build_app(f"127.0.0.1:{running.port}", tokens[0] if len(tokens) == 1 else None)
        server, thread, http_port = start_http_in_thread(app, args.host, args.http_port)
        http = (server, thread)
        print(f"specfleet router: OpenAI-compatible HTTP on http://{args.host}:{http_port}/v1", flush=True)
    print(f"specfleet {args.role}{' ' + args.pool if args.role == 'drafter' else ''} serving on "
          f"{args.host}:{running.port}"
          + (f" (health checks in plaintext on port {running.health_port})" if running.health_port else ""),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop(args.grace)  # readiness flips first, in-flight calls get the grace period
    if http is not None:
        http[0].should_exit = True
        await asyncio.to_thread(http[1].join, 10)
    shutdown_tracing()  # exports the spans still buffered


def cmd_serve(args) -> int:
    if args.verify_intake < 1:
        sys.exit(f"error: --verify-intake must be >= 1 (rounds a verifier holds at once), got {args.verify_intake}")
    if args.role == "drafter" and not args.pool:
        sys.exit(f"error: serve drafter needs --pool (one of {', '.join(DRAFTER_POOLS + MODEL_FREE_POOLS)})")
    if args.role == "router" and not args.verifiers:
        sys.exit("error: serve router needs --verifiers HOST:PORT[,HOST:PORT...]")
    try:
        asyncio.run(_serve(args))
    except (ValueError, FileNotFoundError, OSError) as exc:
        sys.exit(f"error: {exc}")
    return 0


# ---------------------------------------------------------------- up

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

def _pipe(name: str, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{name:>16} | {line}")
        out.flush()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_up(args) -> int:
    # Ctrl-C and SIGTERM both stop the fleet cleanly, even where SIGINT arrived ignored (background jobs)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    pools = [p for p in _addresses(args.pools)]
    unknown = [p for p in pools if p not in DRAFTER_POOLS + MODEL_FREE_POOLS]
    if unknown:
        sys.exit(f"error: unknown drafter pool(s) {', '.join(unknown)}; choose from "
                 f"{', '.join(DRAFTER_POOLS + MODEL_FREE_POOLS)}")
    try:
        public = resolve_tokens(args.token, args.token_file, "--token", TOKEN_ENV, TOKEN_FILE_ENV)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    internal_token = os.urandom(16).hex()  # internal services accept only the router (and each other)
    internal_secrets = {"token": internal_token}
    certs_dir, inner_tls, router_tls, health_tls = None, [], [], None
    if args.mtls:  # internal services accept only the router's client certificate (and the internal token)
        import tempfile

        from specfleet.security import write_dev_certs

        certs_dir = tempfile.mkdtemp(prefix="specfleet-certs-")  # mode 0700; removed when the fleet stops
        try:
            certs = {k: str(v) for k, v in write_dev_certs(certs_dir, days=7).items()}
        except ValueError as exc:
            import shutil

            shutil.rmtree(certs_dir, ignore_errors=True)
            sys.exit(f"error: --mtls: {exc}")
        inner_tls = ["--tls-cert", certs["server"], "--tls-key", certs["server_key"], "--tls-client-ca", certs["ca"]]
        router_tls = ["--internal-tls-ca", certs["ca"], "--internal-tls-cert", certs["client"],
                      "--internal-tls-key", certs["client_key"]]
        health_tls = ChannelTls.from_files(certs["ca"], certs["client"], certs["client_key"])
    embedded = None
    redis_url = args.redis_url
    if not redis_url:
        from specfleet.state import start_embedded_redis

        embedded = start_embedded_redis()
        redis_url = embedded.url
        print(f"embedded Redis on {redis_url}", flush=True)
    common = ["--models", str(args.models), "--redis-url", redis_url, "--key-prefix", args.key_prefix,
              "--slots", str(args.slots), *_tracing_args(args)]
    plan: list[tuple[str, list[str], int, dict]] = []  # name, serve arguments, port, tokens (passed by environment)
    drafters = {}
    for pool in pools:
        port = free_port()
        drafters[pool] = f"127.0.0.1:{port}"
        plan.append((f"drafter-{pool}", ["drafter", "--pool", pool, *inner_tls], port, internal_secrets))
    verifiers = []
    for i in range(args.verifiers):
        port = free_port()
        verifiers.append(f"127.0.0.1:{port}")
        plan.append((f"verifier-{i}", ["verifier", *inner_tls], port, internal_secrets))
    fusion = ""
    if len(pools) > 1 and args.fusion:
        port = free_port()
        fusion = f"127.0.0.1:{port}"
        plan.append(("fusion", ["fusion", *inner_tls], port, internal_secrets))
    router = ["router", "--drafters", ",".join(f"{p}={a}" for p, a in drafters.items()),
              "--verifiers", ",".join(verifiers), "--fusion", fusion, "--k", str(args.k)] + (
              [] if args.adaptive else ["--no-adaptive"]) + (
              [] if args.pipeline else ["--no-pipeline"]) + ([] if args.routing else ["--no-routing"]) + (
              ["--verify-queue", args.verify_queue] + ([] if args.dsi else ["--no-dsi"])) + router_tls
    # the router accepts every public token (one per caller, each rate-limited on its own)
    router_secrets = {"token": public[0] if len(public) == 1 else None, "internal_token": internal_token}
    if len(public) > 1:
        router += ["--token-file", str(args.token_file or os.environ[TOKEN_FILE_ENV])]  # a path, not a secret
    router += [f"--rate-limit-rps={args.rate_limit_rps:g}", f"--rate-limit-tpm={args.rate_limit_tpm:g}"]
    plan.append(("router", router, args.grpc_port, router_secrets))
    http = None
    autoscaler_stop = None
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}

    def spawn(name: str, role_args: list[str], port: int, secrets: dict) -> subprocess.Popen:
        cmd = child_command(role_args, port, common)
        # the heartbeat id the autoscaler knows it by; tokens by environment, never in argv
        child_env = child_env_of(name, secrets)
        if not name.startswith("verifier"):
            # small models: one thread each, idle threads sleeping instead of spinning, so the verifier keeps
            # the cores (measured: 2.4x the fleet's throughput at concurrency 32 on 2 cores)
            child_env.setdefault("OMP_NUM_THREADS", "1")
            child_env.setdefault("OMP_WAIT_POLICY", "passive")
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env)
        threading.Thread(target=_pipe, args=(name, child.stdout, sys.stdout), daemon=True).start()
        return child

    from specfleet.local_autoscale import LocalReplicas, role_args

    def child_env_of(name: str, secrets: dict) -> dict[str, str]:
        return child_env({**env, "SPECFLEET_POD_NAME": name}, **secrets)

    replicas = LocalReplicas(lambda role, pod: spawn(pod, role_args(role) + inner_tls, free_port(), internal_secrets),
                             grace_s=args.grace)
    try:
        for name, role_cmd, port, secrets in plan:
            role = "verifier" if name.startswith("verifier-") else name
            replicas.add(role, name, spawn(name, role_cmd, port, secrets))
        from specfleet.server import wait_healthy

        started = time.monotonic()

        async def all_healthy():  # every service, not only the router: a first request must find them all up
            await asyncio.gather(*(wait_healthy(f"127.0.0.1:{port}", timeout=args.ready_timeout,
                                                tls=None if name == "router" else health_tls)
                                   for name, _, port, _ in plan))

        asyncio.run(all_healthy())
        http_note = ""
        if args.http_port >= 0:
            from specfleet.telemetry import configure_tracing

            configure_tracing("specfleet-http", args.otlp_endpoint, args.trace_console)  # the front runs here
            from specfleet.router.http import build_app, start_http_in_thread

            app = build_app(f"127.0.0.1:{args.grpc_port}", public[0] if len(public) == 1 else None)
            server, thread, http_port = start_http_in_thread(app, "127.0.0.1", args.http_port)
            http = (server, thread)
            http_note = f", OpenAI-compatible HTTP on http://127.0.0.1:{http_port}/v1"
        print(f"specfleet is up in {time.monotonic() - started:.1f}s: router gRPC on 127.0.0.1:{args.grpc_port}"
              f"{http_note} ({len(pools)} drafter pools, {args.verifiers} verifier(s)); Ctrl-C stops it.\n"
              f"  try: specfleet client generate 'def main():' --target 127.0.0.1:{args.grpc_port}", flush=True)
        if args.exit_when_ready:
            return 0
        if args.autoscale:
            from specfleet.local_autoscale import local_spec, start_autoscaler

            spec = local_spec(pools, args.verifiers, args.max_verifiers, args.max_drafters, args.autoscale_interval,
                              fusion=bool(fusion))
            _, autoscaler_stop = start_autoscaler(replicas, redis_url, args.key_prefix, spec, args.autoscale_interval,
                                                  lambda line: print(f"{'autoscale':>16} | {line}", flush=True))
            print(f"autoscaling: verifiers 1-{max(args.verifiers, args.max_verifiers)}, each drafter pool "
                  f"1-{args.max_drafters}, a step every {args.autoscale_interval:g}s", flush=True)
        while not replicas.failed():
            time.sleep(0.5)
        print(f"error: {', '.join(replicas.failed())} exited; stopping the fleet", file=sys.stderr)
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
            from specfleet.telemetry import shutdown_tracing

            http[0].should_exit = True
            http[1].join(timeout=10)
            shutdown_tracing()
        children = [child for _, child in replicas.all()]
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=args.grace + 10)
            except subprocess.TimeoutExpired:
                child.kill()
        if embedded is not None:
            embedded.stop()
        if certs_dir is not None:
            import shutil

            shutil.rmtree(certs_dir, ignore_errors=True)


def _ablation_flags(p: argparse.ArgumentParser, scope: str) -> None:
    """The CoSine switches a benchmark turns off one at a time."""
    p.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                   help=f"{scope}draft strictly after each verification (default: draft the next round while this "
                        "one is verified, PipeInfer-style, dropping drafts the verification invalidates)")
    p.add_argument("--no-routing", dest="routing", action="store_false",
                   help=f"{scope}one drafter pool picked at random each round instead of expertise routing")
    p.add_argument("--verify-queue", choices=("stream", "rpc"), default="stream",
                   help=f"{scope}how rounds reach the verifiers: 'stream' (default) through the Redis stream "
                        "PREFIX:stream:verify with consumer group 'verifiers' (any verifier takes a round; a dead "
                        "or hung one's rounds are reclaimed after 3 s); 'rpc' straight gRPC calls, sticky per request")
    p.add_argument("--no-dsi", dest="dsi", action="store_false",
                   help=f"{scope}no speculation parallelism (default with >= 2 verifiers: the round after the one "
                        "being verified is verified concurrently, DSI-style, and kept when the first confirms it)")


def _tracing_flags(p: argparse.ArgumentParser, scope: str) -> None:
    p.add_argument("--otlp-endpoint", default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
                   help=f"export OpenTelemetry traces of {scope} over OTLP/gRPC to this collector, e.g. "
                        "http://127.0.0.1:4317 (http: plaintext); needs opentelemetry-exporter-otlp-proto-grpc; "
                        "env OTEL_EXPORTER_OTLP_ENDPOINT; unset: no tracing (see docs/tracing.md)")
    p.add_argument("--trace-console", action="store_true", help=f"print every span of {scope} to stdout")


def _tracing_args(args) -> list[str]:
    """The tracing flags `up` passes on to each service it starts."""
    return ([f"--otlp-endpoint={args.otlp_endpoint}"] if args.otlp_endpoint else []) + (
        ["--trace-console"] if args.trace_console else [])


def add_parsers(sub, fmt, models_default: Path) -> None:
    p = sub.add_parser("serve", formatter_class=fmt, help="run one fleet service (router, drafter, fusion, verifier)",
                       description="Runs one specfleet gRPC service in this process until SIGTERM / Ctrl-C, then stops "
                                   "gracefully (health flips to NOT_SERVING, in-flight calls get --grace seconds).")
    p.add_argument("role", choices=ROLES)
    p.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=0, help="listen port (0: any free port, printed at start)")
    p.add_argument("--health-port", type=int, default=-1,
                   help="also answer gRPC health checks, and nothing else, in plaintext on --host:PORT: kubelet's "
                        "gRPC probes cannot present a client certificate to an mTLS port (0: any free port; -1: none)")
    p.add_argument("--http-port", type=int, default=-1,
                   help="router only: also serve the OpenAI-compatible HTTP API (and /metrics) on --host:PORT "
                        "(0: any free port; -1: none)")
    p.add_argument("--models", type=Path, default=models_default, help="folder of bundled models")
    p.add_argument("--redis-url", default=os.environ.get("SPECFLEET_REDIS_URL"),
                   help="Redis for request state (verifier, router); env SPECFLEET_REDIS_URL")
    p.add_argument("--key-prefix", default="sf", help="Redis key prefix (one per fleet)")
    # no defaults from the environment here: --help prints defaults, and a token must never be printed
    p.add_argument("--token",
                   help="bearer token callers must send (router: public clients; others: the internal token); "
                        f"env {TOKEN_ENV} (preferred: a command line is visible to every local user) or --token-file")
    p.add_argument("--token-file", type=Path,
                   help="read the accepted bearer token(s) from this file, one a line (a mounted Secret; a router "
                        f"accepts each line as one caller's token, rate-limited on its own); env {TOKEN_FILE_ENV}")
    p.add_argument("--internal-token",
                   help=f"router only: the token it sends to internal services; env {INTERNAL_TOKEN_ENV} "
                        "(preferred) or --internal-token-file")
    p.add_argument("--internal-token-file", type=Path,
                   help=f"router only: read the internal token from this file; env {INTERNAL_TOKEN_FILE_ENV}")
    g = p.add_argument_group("TLS (see docs/reliability.md#security; `specfleet certs DIR` makes development certs)")
    g.add_argument("--tls-cert", type=Path, help="serve TLS with this PEM certificate (chain)")
    g.add_argument("--tls-key", type=Path, help="the PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", type=Path,
                   help="require callers to present a certificate signed by this PEM CA (mTLS): internal services "
                        "then accept only the router and each other")
    g.add_argument("--internal-tls-ca", type=Path,
                   help="router only: reach internal services over TLS, trusting this PEM CA")
    g.add_argument("--internal-tls-cert", type=Path,
                   help="router only: the client certificate it presents to internal services (mTLS)")
    g.add_argument("--internal-tls-key", type=Path, help="router only: the PEM private key of --internal-tls-cert")
    g.add_argument("--internal-tls-server-name",
                   help="router only: the name internal services' certificates carry, when it differs from the "
                        "addresses dialled (e.g. pod IPs from heartbeats)")
    p.add_argument("--rate-limit-rps", type=float, default=0.0,
                   help="router only: requests per second per caller token (bursts up to max(1, N)); over it a call "
                        "gets RESOURCE_EXHAUSTED (HTTP 429) with a retry-after; 0: no limit")
    p.add_argument("--rate-limit-tpm", type=float, default=0.0,
                   help="router only: generated tokens per minute per caller token; a caller over it is refused "
                        "new requests until its budget refills; 0: no limit")
    p.add_argument("--pool", help="drafter only: the pool to serve (python, prose, c, general, suffix, ngram)")
    p.add_argument("--drafters", help="router only: POOL=HOST:PORT,... of the drafter pools")
    p.add_argument("--verifiers", help="router only: HOST:PORT,... of the verifiers")
    p.add_argument("--fusion", help="router only: HOST:PORT of the fusion service")
    p.add_argument("--k", type=int, default=4, help="router only: most draft levels per round")
    p.add_argument("--max-queue-wait-ms", type=float, default=0.0,
                   help="router only: refuse new requests (RESOURCE_EXHAUSTED / HTTP 429) while the oldest round in "
                        "the verify stream has waited longer than this (0: off)")
    p.add_argument("--rpc-timeout", type=float, default=30.0,
                   help="router only: deadline in seconds of each call to a drafter, fusion or verifier; a hung "
                        "verifier's round moves to the next one after it")
    p.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                   help="router only: always draft k levels with every pool (no speculation control)")
    _ablation_flags(p, "router only: ")
    p.add_argument("--profile", type=Path, default=None,
                   help="verifier only: a `specfleet profile` JSON; each forward is capped to the tokens that fit "
                        "in --max-batch-latency-ms by its cost model")
    p.add_argument("--max-batch-latency-ms", type=float, default=50.0,
                   help="verifier only, with --profile: the latency bound of one batched forward")
    p.add_argument("--max-batch-tokens", type=int, default=0,
                   help="verifier only: at most this many tokens per forward (0: the profile's cap, or none)")
    p.add_argument("--slots", type=int, default=32, help="requests with a KV cache per drafter / verifier")
    p.add_argument("--verify-intake", type=int, default=32,
                   help="verifier only: the most rounds it takes from the verify stream at once (at most --slots); "
                        "the rest wait in the stream, first come first served across verifiers")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on shutdown")
    _tracing_flags(p, "this service")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("up", formatter_class=fmt, help="start the whole fleet as local processes",
                       description="Starts drafter pools, verifier(s), fusion and the router as local processes (and "
                                   "an embedded Redis unless --redis-url is given), all on 127.0.0.1; ready when the "
                                   "router's health check answers SERVING; Ctrl-C stops everything.")
    p.add_argument("--grpc-port", type=int, default=50051, help="the router's gRPC port on 127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000,
                   help="the OpenAI-compatible HTTP API on 127.0.0.1:PORT (0: any free port; -1: none)")
    p.add_argument("--redis-url", default=os.environ.get("SPECFLEET_REDIS_URL"),
                   help="use this Redis instead of an embedded one")
    p.add_argument("--models", type=Path, default=models_default, help="folder of bundled models")
    p.add_argument("--pools", default="python,prose,c,suffix", help="drafter pools to start")
    p.add_argument("--verifiers", type=int, default=1, help="verifier replicas")
    p.add_argument("--token",
                   help=f"bearer token clients must send (prefer env {TOKEN_ENV} or --token-file); services get "
                        "their tokens by environment, never on their command line")
    p.add_argument("--token-file", type=Path,
                   help=f"accepted client tokens, one a line (each rate-limited on its own by the router); env "
                        f"{TOKEN_FILE_ENV}")
    p.add_argument("--key-prefix", default="sf", help="Redis key prefix")
    p.add_argument("--rate-limit-rps", type=float, default=0.0, help="requests per second per client token (0: off)")
    p.add_argument("--rate-limit-tpm", type=float, default=0.0,
                   help="generated tokens per minute per client token (0: off)")
    p.add_argument("--slots", type=int, default=32, help="requests with a KV cache per drafter / verifier")
    p.add_argument("--k", type=int, default=4, help="most draft levels per round (0: plain decoding)")
    p.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                   help="always draft k levels with every pool (no speculation control)")
    _ablation_flags(p, "")
    p.add_argument("--mtls", action="store_true",
                   help="internal services speak mTLS with certificates from a throwaway CA made at start (needs "
                        "the cryptography package): they accept only the router's client certificate")
    p.add_argument("--no-fusion", dest="fusion", action="store_false",
                   help="no fusion service: each round drafts with the single best routed pool")
    p.add_argument("--autoscale", action="store_true",
                   help="run the operator's autoscaling loop on these processes: verifiers and drafter pools grow "
                        "with load and shrink (drained first, nothing lost) when it falls")
    p.add_argument("--max-verifiers", type=int, default=3, help="with --autoscale: most verifier processes")
    p.add_argument("--max-drafters", type=int, default=2, help="with --autoscale: most processes per drafter pool")
    p.add_argument("--autoscale-interval", type=float, default=2.0, help="with --autoscale: seconds between steps")
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls get on Ctrl-C")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for the router")
    p.add_argument("--exit-when-ready", action="store_true", help=argparse.SUPPRESS)
    _tracing_flags(p, "every service (and the HTTP front)")
    p.set_defaults(func=cmd_up)
