"""`specfleet up`: the whole fleet as local processes (the work itself is in `specfleet.local.up`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from specfleet.cli.options import ablation_flags, kv_options, model_options, tracing_flags
from specfleet.router.limits import SERVED_MODEL_NAME
from specfleet.runtime.security import TOKEN_ENV, TOKEN_FILE_ENV


def cmd_up(args) -> int:
    from specfleet.local.up import run

    return run(args)


def add_parser(sub, fmt) -> None:
    p = sub.add_parser("up", formatter_class=fmt, help="start the whole fleet as local processes",
                       description="Starts drafter pools, verifier(s), fusion and the router as local processes (and "
                                   "an embedded Redis unless --redis-url is given), all on 127.0.0.1; ready when the "
                                   "router's health check answers SERVING; Ctrl-C stops everything.")
    p.add_argument("--grpc-port", type=int, default=50051, help="the router's gRPC port on 127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000,
                   help="the OpenAI-compatible HTTP API on 127.0.0.1:PORT (0: any free port; -1: none)")
    p.add_argument("--served-model-name", default=SERVED_MODEL_NAME,
                   help="the model id the HTTP API lists in /v1/models and accepts in a request's `model`")
    p.add_argument("--redis-url", default=os.environ.get("SPECFLEET_REDIS_URL"),
                   help="use this Redis instead of an embedded one")
    model_options(p)
    kv_options(p)
    p.add_argument("--pools", default="python,prose,c,suffix",
                   help="drafter pools to start: drafter names (bundled or --drafter NAME), suffix / ngram, and head "
                        "(the draft head of --head / MODELS/head: the verifiers then return the target's features)")
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
    ablation_flags(p, "")
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
    tracing_flags(p, "every service (and the HTTP front)")
    p.set_defaults(func=cmd_up)
