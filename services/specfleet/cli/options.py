"""What several `specfleet` commands share: default folders, argument types, the engine's and the fleet
benchmarks' options, and building an engine from them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
# Defaults point into the checkout (an editable install); SPECFLEET_MODELS / SPECFLEET_DATA override them.
DEFAULT_MODELS = Path(os.environ.get("SPECFLEET_MODELS", REPO_ROOT / "models"))
DEFAULT_DATA = Path(os.environ.get("SPECFLEET_DATA", REPO_ROOT / "data"))
DEFAULT_BENCH = REPO_ROOT / "bench"
DEFAULT_KV_CACHE_MEMORY_TEXT = "4GiB"  # engine/llama.py DEFAULT_KV_CACHE_MEMORY


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def unit_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def model_dir(path: Path) -> Path:
    if not (path / "config.json").exists():
        sys.exit(f"error: no model at {path} (expected a Hugging Face folder with config.json); "
                 "the bundled ones are in models/, or rebuild them with `make models`")
    return path


def model_options(p: argparse.ArgumentParser) -> None:
    """--models, --target and --drafter: which checkpoints to run (the bundled family by default)."""
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS,
                   help="folder of models laid out as the bundled ones (target/, drafter-NAME/)")
    p.add_argument("--target", type=Path, default=None,
                   help="the target: any Hugging Face folder of a supported family (Llama, Mistral, Qwen2, Qwen3) "
                        "(default: MODELS/target)")
    p.add_argument("--drafter", action="append", default=[], metavar="NAME=PATH",
                   help="a drafter by name, from a Hugging Face folder sharing the target's vocabulary (repeatable; "
                        "adds to or replaces MODELS/drafter-NAME); --drafters and --pools take these names")
    p.add_argument("--head", type=Path, default=None,
                   help="a draft head trained for this target (`specfleet train head`; default: MODELS/head when "
                        "present); the drafter named head (--proposer head, or head in --drafters)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights, activations and KV cache (auto: float32 on the CPU, the checkpoint's own dtype on "
                        "CUDA); output equals Hugging Face's in the same dtype")
    device_option(p)


def device(text: str) -> str:
    """--device's type: auto, cpu, cuda or cuda:N (whether torch sees that device is checked when models load)."""
    from specfleet.engine.models import DEVICE

    if not DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device, default="auto",
                   help="where the models run: cpu, cuda or cuda:N (auto: cuda when torch sees a CUDA device, else "
                        "cpu); cuda without a visible device is an error. CUDA serving is implemented but not yet "
                        "tested on a GPU (`make gpu-check`)")


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10, "m": 10**6, "mb": 10**6, "mi": 2**20,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30, "t": 10**12, "tb": 10**12, "ti": 2**40,
          "tib": 2**40}  # Kubernetes' Ki / Mi / Gi / Ti too


def byte_size(text: str) -> int:
    """'4GiB', '4Gi', '512MiB', '1.5GB' or a number of bytes -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 4GiB, 512MiB or 1000000, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def kv_options(p: argparse.ArgumentParser) -> None:
    """--max-model-len and --kv-cache-memory: how much context and KV cache the models may hold."""
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="most positions (prompt + output) a request may use; longer requests are refused with a "
                        "message (default: the target's max_position_embeddings)")
    p.add_argument("--kv-cache-memory", type=byte_size, default=DEFAULT_KV_CACHE_MEMORY_TEXT,
                   help="KV cache per model (target, each drafter), e.g. 4GiB (= 4Gi) or 512MiB; it holds fewer "
                        "concurrent requests than asked for when it must (the rest wait), and too small for one "
                        "request of --max-model-len is an error at start")


def kv_limits_from_args(args):
    from specfleet.engine.llama import KvLimits

    return KvLimits(args.max_model_len, args.kv_cache_memory)


def model_set_from_args(args):
    """The ModelSet the --models / --target / --drafter options name; exits with a clear message on bad input."""
    from specfleet.engine.models import ModelSet

    try:
        return ModelSet.bundled(args.models).with_overrides(getattr(args, "target", None),
                                                            getattr(args, "drafter", None) or (),
                                                            getattr(args, "dtype", None),
                                                            getattr(args, "head", None),
                                                            getattr(args, "device", None))
    except ValueError as exc:
        sys.exit(f"error: {exc}")


def engine_from_args(args, batch_size: int):
    """(engine, tokenizer) from the generate/demo/bench options; exits with a clear message on bad input."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from specfleet.engine.factory import build_engine, parse_drafters

    hf_logging.disable_progress_bar()  # the per-tensor loading bar would interleave with streamed text
    models = model_set_from_args(args)
    try:
        known = tuple(models.drafters) + (("head",) if models.head is not None else ())
        drafters = parse_drafters(args.drafters, args.proposer, known)
        engine = build_engine(models, args.proposer, drafters, batch_size=batch_size, k=args.k,
                              adaptive=args.adaptive, limits=kv_limits_from_args(args))
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    return engine, AutoTokenizer.from_pretrained(str(models.target))


def sampling_from_args(args):
    from specfleet.engine.sampling import SamplingParams

    return SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)


def engine_options(p: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    from specfleet.engine.factory import PROPOSERS

    model_options(p)
    kv_options(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, help="tokens to generate")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="random seed; equal seeds give equal samples")
    p.add_argument("--proposer", choices=PROPOSERS, default="fused",
                   help="who drafts: fused (several drafter models, CoSine fusion), model (one drafter), suffix "
                        "(suffix trees), ngram (prompt lookup), none (plain decoding, same code path)")
    p.add_argument("--drafters", default=None,
                   help="comma-separated drafter names for model/fused: python, prose, c, general or a --drafter "
                        "NAME (default: general for model, python,prose,c for fused; else every drafter given)")
    p.add_argument("--k", type=positive_int, default=4, help="most draft levels per round")
    p.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                   help="always draft k levels with every drafter (default: adaptive speculation control)")


def fleet_bench_options(b: argparse.ArgumentParser) -> None:
    """What every benchmark that starts a fleet takes: the models and the Redis it keeps state in."""
    b.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of bundled models")
    b.add_argument("--redis-url", default=os.environ.get("SPECFLEET_REDIS_URL", "redis://127.0.0.1:6379/0"),
                   help="Redis for the fleet's state (keys under a fresh prefix, removed afterwards)")


def ablation_flags(p: argparse.ArgumentParser, scope: str) -> None:
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


def tracing_flags(p: argparse.ArgumentParser, scope: str) -> None:
    p.add_argument("--otlp-endpoint", default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
                   help=f"export OpenTelemetry traces of {scope} over OTLP/gRPC to this collector, e.g. "
                        "http://127.0.0.1:4317 (http: plaintext); needs opentelemetry-exporter-otlp-proto-grpc; "
                        "env OTEL_EXPORTER_OTLP_ENDPOINT; unset: no tracing (see docs/tracing.md)")
    p.add_argument("--trace-console", action="store_true", help=f"print every span of {scope} to stdout")

