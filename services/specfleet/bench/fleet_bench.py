"""`specfleet bench fleet`: what the fleet (gRPC + Redis between router, drafters, fusion and verifier) costs and
delivers against the in-process engine on the same models and prompts, measured side by side in one run.

- per-round overhead: plain decoding (no drafts) through both; the fleet's round time (gaps between streamed
  messages at concurrency 1) minus the engine's median round time, p50 and p99;
- throughput at concurrency 1, 8, 32: the fleet (concurrent streams) against the engine (batch = concurrency),
  greedy, with speculation on in both.
The fleet is started with `specfleet up` (each service its own process, gRPC on loopback, the given Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from specfleet.state.embedded import free_port

SYSTEM_POOLS = ("python", "prose", "c", "suffix")


@contextlib.contextmanager
def fleet_processes(models_dir: Path, redis_url: str, prefix: str, slots: int, extra: list[str]):
    """`specfleet up` in its own process group; yields the router's address; stops it all on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "specfleet.cli", "up", "--grpc-port", str(port), "--http-port", "-1", "--models",
           str(models_dir), "--redis-url", redis_url, "--key-prefix", prefix, "--slots", str(slots),
           "--pools", ",".join(SYSTEM_POOLS), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "specfleet is up" in line:
                break
        else:
            raise RuntimeError(f"specfleet up exited with {proc.wait()}")
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _stream(address: str, ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    import grpc

    from specfleet.api.v1 import router_pb2, router_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        tokens, stamps = [], [time.perf_counter()]
        async for message in stub.Generate(router_pb2.GenerateRequest(prompt_token_ids=ids,
                                                                       max_new_tokens=new_tokens), timeout=600):
            tokens += message.token_ids
            stamps.append(time.perf_counter())
        return tokens, stamps


def run(models_dir: Path, redis_url: str, new_tokens: int, limit: int, output: Path,
        concurrency: tuple[int, ...] = (1, 8, 32), progress: bool = True) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from specfleet.bench.engine_bench import load_prompts
    from specfleet.engine.engine import Request
    from specfleet.engine.factory import build_engine, load_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(models_dir / "target"))
    prompts = [p.ids for p in load_prompts(tok, None, limit, 64)]
    target = load_model(models_dir, "target")
    prefix = f"sfbench-{uuid.uuid4().hex[:8]}"
    steps = 2 + 2 * len(concurrency)
    bar = tqdm(total=steps, desc="bench fleet", unit="step", disable=not progress)
    results: dict = {"config": {"prompts": len(prompts), "max_new_tokens": new_tokens, "redis": redis_url,
                                "pools": list(SYSTEM_POOLS), "fleet": "specfleet up: one process per service"}}

    # 1. per-round overhead: plain decoding through the engine and through the fleet
    engine = build_engine(models_dir, "none", batch_size=1, target=target)
    engine_rounds: list[float] = []
    for i, ids in enumerate(prompts):
        stamps = [time.perf_counter()]

        def stamp(rid, new, stamps=stamps):
            stamps.append(time.perf_counter())

        engine.generate([Request(f"e{i}", ids, new_tokens)], on_tokens=stamp)
        engine_rounds += [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    bar.update()
    slots = max(concurrency) + 8
    with fleet_processes(models_dir, redis_url, prefix, slots, ["--k", "0", "--no-adaptive"]) as plain:
        fleet_rounds: list[float] = []
        for ids in prompts:
            _, stamps = asyncio.run(_stream(plain, ids, new_tokens))
            fleet_rounds += [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    bar.update()
    base = statistics.median(engine_rounds)
    overhead = [r - base for r in fleet_rounds]
    results["round_overhead_ms"] = {"engine_round_p50": round(base * 1e3, 3),
                                    "fleet_round_p50": round(statistics.median(fleet_rounds) * 1e3, 3),
                                    "p50": round(_percentile(overhead, 0.5) * 1e3, 3),
                                    "p99": round(_percentile(overhead, 0.99) * 1e3, 3)}

    # 2. throughput at each concurrency, speculation on in both
    rows = []
    with fleet_processes(models_dir, redis_url, prefix + "-t", slots, []) as fleet:
        for c in concurrency:
            batch = [prompts[i % len(prompts)] for i in range(c)]
            eng = build_engine(models_dir, "fused", batch_size=c, target=target)
            start = time.perf_counter()
            outs = eng.generate([Request(f"t{c}-{i}", ids, new_tokens) for i, ids in enumerate(batch)])
            engine_s = time.perf_counter() - start
            bar.update()

            async def all_streams(batch=batch):
                return await asyncio.gather(*(_stream(fleet, ids, new_tokens) for ids in batch))

            start = time.perf_counter()
            streams = asyncio.run(all_streams())
            fleet_s = time.perf_counter() - start
            bar.update()
            tokens = sum(len(o.token_ids) for o in outs)
            same = sum(list(s[0]) == o.token_ids for s, o in zip(streams, outs, strict=True))
            rows.append({"concurrency": c, "engine_tokens_per_s": round(tokens / engine_s, 2),
                         "fleet_tokens_per_s": round(sum(len(s[0]) for s in streams) / fleet_s, 2),
                         "fleet_vs_engine": round(sum(len(s[0]) for s in streams) / fleet_s / (tokens / engine_s), 3),
                         "identical_outputs": f"{same}/{c}"})
    bar.close()
    results["throughput"] = rows
    _cleanup(redis_url, prefix)
    _cleanup(redis_url, prefix + "-t")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _cleanup(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def format_table(report: dict) -> str:
    o = report["round_overhead_ms"]
    lines = [f"per-round fleet overhead (gRPC + Redis): p50 {o['p50']:.2f} ms, p99 {o['p99']:.2f} ms "
             f"(engine round {o['engine_round_p50']:.2f} ms, fleet round {o['fleet_round_p50']:.2f} ms)", "",
             f"{'concurrency':>12}{'engine tok/s':>14}{'fleet tok/s':>13}{'fleet/engine':>14}{'identical':>11}"]
    for r in report["throughput"]:
        lines.append(f"{r['concurrency']:>12}{r['engine_tokens_per_s']:>14.1f}{r['fleet_tokens_per_s']:>13.1f}"
                     f"{r['fleet_vs_engine']:>13.2f}x{r['identical_outputs']:>11}")
    return "\n".join(lines)
