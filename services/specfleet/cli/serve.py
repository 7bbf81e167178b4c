"""`specfleet serve ROLE`: one fleet service in this process until SIGTERM / Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from specfleet.cli.options import ablation_flags, kv_options, model_options, model_set_from_args, tracing_flags
from specfleet.drafter.serve import DRAFTER_POOLS, HEAD_POOL, MODEL_FREE_POOLS
from specfleet.router.limits import SERVED_MODEL_NAME
from specfleet.runtime.process import ServeOptions
from specfleet.runtime.security import (
    INTERNAL_TOKEN_ENV,
    INTERNAL_TOKEN_FILE_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    ChannelTls,
    ServerTls,
    resolve_tokens,
)
from specfleet.state.connection import REDIS_URL_ENV, REDIS_URL_FILE_ENV, resolve_redis_url

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
    from specfleet.runtime.telemetry import configure_tracing, shutdown_tracing

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
    redis_url = resolve_redis_url(args.redis_url, args.redis_url_file)
    models = model_set_from_args(args)
    opts = ServeOptions(models, redis_url, args.host, tokens or None, args.slots, args.key_prefix,
                        max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
                        profile=args.profile, max_batch_latency_ms=args.max_batch_latency_ms,
                        max_batch_tokens=args.max_batch_tokens, tls=tls, rate_limit_rps=args.rate_limit_rps,
                        rate_limit_tpm=args.rate_limit_tpm,
                        health_port=None if args.health_port < 0 else args.health_port,
                        verify_intake=args.verify_intake)
    if args.role == "drafter":
        from specfleet.drafter.serve import start_drafter

        running, _ = await start_drafter(args.pool, opts, args.port)
    elif args.role == "fusion":
        from specfleet.fusion.serve import start_fusion

        running, _ = await start_fusion(opts, args.port)
    elif args.role == "verifier":
        from specfleet.verifier.serve import start_verifier

        running, _ = await start_verifier(opts, args.port)
    else:
        from specfleet.router.serve import start_router
        from specfleet.router.service import FleetConfig

        config = FleetConfig(drafters=_pools(args.drafters), verifiers=_addresses(args.verifiers),
                             fusion=args.fusion or None, k_max=args.k, adaptive=args.adaptive,
                             pipeline=args.pipeline, routing=args.routing, rpc_timeout_s=args.rpc_timeout,
                             verify_queue=args.verify_queue, dsi=args.dsi,
                             max_queue_wait_ms=args.max_queue_wait_ms)
        internal_tls = ChannelTls.from_files(args.internal_tls_ca, args.internal_tls_cert, args.internal_tls_key,
                                             args.internal_tls_server_name)
        running, _ = await start_router(opts, config, args.port, internal[0] if internal else None, internal_tls)
    http = None
    if args.role == "router" and args.http_port >= 0:
        from specfleet.router.http import build_app, start_http_in_thread

        # the HTTP front calls this process's gRPC router over loopback, with the public token; with several
        # tokens it passes each caller's own on (the router checks it and rate-limits per token)
        app = build_app(f"127.0.0.1:{running.port}", tokens[0] if len(tokens) == 1 else None,
                        args.served_model_name)
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
    stopping = time.monotonic()
    await running.stop(args.grace)  # readiness flips first, in-flight calls get the grace period
    # (a router with another replica alive hands its streams over instead of finishing them)
    print(f"specfleet {args.role}: in-flight calls done {time.monotonic() - stopping:.2f} s after the stop signal",
          flush=True)
    if http is not None:
        http[0].should_exit = True
        await asyncio.to_thread(http[1].join, 10)
    shutdown_tracing()  # exports the spans still buffered


def cmd_serve(args) -> int:
    if args.verify_intake < 1:
        sys.exit(f"error: --verify-intake must be >= 1 (rounds a verifier holds at once), got {args.verify_intake}")
    if args.role == "drafter" and not args.pool:
        sys.exit(f"error: serve drafter needs --pool (a drafter's name, e.g. {', '.join(DRAFTER_POOLS)}, one of "
                 f"{', '.join(MODEL_FREE_POOLS)}, or {HEAD_POOL}: the draft head)")
    if args.role == "router" and not args.verifiers:
        sys.exit("error: serve router needs --verifiers HOST:PORT[,HOST:PORT...]")
    try:
        asyncio.run(_serve(args))
    except (ValueError, FileNotFoundError, OSError) as exc:
        sys.exit(f"error: {exc}")
    return 0


def add_parser(sub, fmt) -> None:
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
    p.add_argument("--served-model-name", default=SERVED_MODEL_NAME,
                   help="router only, with --http-port: the model id the HTTP API lists in /v1/models and accepts "
                        "in a request's `model`")
    model_options(p)
    kv_options(p)
    # no default from the environment: --help prints defaults, and the URL may carry a password
    p.add_argument("--redis-url",
                   help=f"Redis for request state (verifier, router); env {REDIS_URL_ENV} or --redis-url-file")
    p.add_argument("--redis-url-file", type=Path,
                   help=f"read the Redis URL from this file (a mounted Secret); env {REDIS_URL_FILE_ENV}")
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
    p.add_argument("--pool", help="drafter only: the pool to serve (python, prose, c, general, suffix, ngram, or head: "
                                  "the draft head of --head / MODELS/head, drafting from the features the verifiers "
                                  "return)")
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
    ablation_flags(p, "router only: ")
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
    tracing_flags(p, "this service")
    p.set_defaults(func=cmd_serve)
