"""`specfleet bench fleet`: what the fleet (gRPC + Redis between router, drafters, fusion and verifier) costs and
delivers against the in-process engine on the same models and prompts, measured side by side in one run.

- per-round overhead: plain decoding (no drafts) through both; the fleet's round time (gaps between streamed
  messages at concurrency 1) minus the engine's median round time, p50 and p99;
- throughput at concurrency 1, 8, 32: the fleet (concurrent streams) against the engine (batch = concurrency),
  greedy, with speculation on in both.
The fleet here runs every service in one process on one event loop (real gRPC on loopback, the given Redis);
`specfleet up` puts each in its own process."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path

SYSTEM_POOLS = ("python", "prose", "c", "suffix")


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
    from specfleet.fleet import LocalFleet, ServeOptions

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(models_dir / "target"))
    prompts = [p.ids for p in load_prompts(tok, None, limit, 64)]
    target = load_model(models_dir, "target")
    prefix = f"sfbench-{uuid.uuid4().hex[:8]}"
    steps = 2 + 2 * len(concurrency)
    bar = tqdm(total=steps, desc="bench fleet", unit="step", disable=not progress)
    results: dict = {"config": {"prompts": len(prompts), "max_new_tokens": new_tokens, "redis": redis_url,
                                "pools": list(SYSTEM_POOLS), "fleet": "all services in one process (LocalFleet)"}}

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
    opts = ServeOptions(models_dir, redis_url=redis_url, key_prefix=prefix, slots=max(concurrency) + 8)
    with LocalFleet(opts, pools=SYSTEM_POOLS, adaptive=False, k_max=0) as plain:
        fleet_rounds: list[float] = []
        for ids in prompts:
            _, stamps = asyncio.run(_stream(plain.router_address, ids, new_tokens))
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
    with LocalFleet(opts, pools=SYSTEM_POOLS) as fleet:
        for c in concurrency:
            batch = [prompts[i % len(prompts)] for i in range(c)]
            eng = build_engine(models_dir, "fused", batch_size=c, target=target)
            start = time.perf_counter()
            outs = eng.generate([Request(f"t{c}-{i}", ids, new_tokens) for i, ids in enumerate(batch)])
            engine_s = time.perf_counter() - start
            bar.update()

            async def all_streams(batch=batch):
                return await asyncio.gather(*(_stream(fleet.router_address, ids, new_tokens) for ids in batch))

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
