"""`specfleet bench fleet`: what the fleet (gRPC + Redis between router, drafters, fusion and verifier) costs and
delivers against the in-process engine on the same models and prompts, measured side by side in one run.

- per-round overhead: plain decoding (no drafts) through both; the fleet's round time (gaps between streamed
  messages at concurrency 1) minus the engine's median round time, p50 and p99; then the round trip hop by hop
  (`bench.overhead`), with the bundled models and with the smallest ones, at each of `hop_concurrency`;
- throughput at concurrency 1, 8, 32: the fleet (concurrent streams) against the engine (batch = concurrency),
  greedy, with speculation on in both;
- the CoSine ablation on the mixed-domain held-out prompts at concurrency 8, each switch off in turn (routing ->
  one random pool per round, fusion -> the single routed pool, pipelining, adaptive control), greedy and sampled
  (T 0.8, top-p 0.95), with accepted tokens per round, throughput and the outputs' distinct-4.
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


async def _stream(address: str, ids: list[int], new_tokens: int, usage: dict | None = None,
                  **sampling) -> tuple[list[int], list[float]]:
    """Streams one request; returns (tokens, arrival times); adds its usage counts into `usage` when given."""
    import grpc

    from specfleet.api.v1 import router_pb2, router_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        tokens, stamps, last = [], [time.perf_counter()], None
        async for message in stub.Generate(router_pb2.GenerateRequest(prompt_token_ids=ids, max_new_tokens=new_tokens,
                                                                       **sampling), timeout=600):
            tokens += message.token_ids
            stamps.append(time.perf_counter())
            last = message
        if usage is not None and last is not None:
            for key in ("rounds", "draft_tokens", "accepted_tokens"):
                usage[key] = usage.get(key, 0) + getattr(last.usage, key)
        return tokens, stamps


# (name, `specfleet up` flags). Adaptive control chooses k per request and would mask what routing, fusion and
# pipelining do to acceptance, so those three are switched off against the same system with k fixed; adaptive
# control itself is the full system against that one.
ABLATION = (("cosine, k fixed", ["--no-adaptive"]),
            ("routing off (random pool)", ["--no-adaptive", "--no-routing"]),
            ("fusion off (single routed pool)", ["--no-adaptive", "--no-fusion"]),
            ("pipelining off", ["--no-adaptive", "--no-pipeline"]),
            ("cosine, adaptive control on", []))
SAMPLED = {"temperature": 0.8, "top_p": 0.95}
# DSI speculation parallelism needs >= 2 verifiers: the same two-verifier fleet with it on and off, the verify
# queue's two transports, and one verifier; k fixed so every row drafts alike.
DSI = (("2 verifiers, DSI on", ["--no-adaptive", "--verifiers", "2"]),
       ("2 verifiers, DSI off", ["--no-adaptive", "--verifiers", "2", "--no-dsi"]),
       ("2 verifiers, DSI off, gRPC queue", ["--no-adaptive", "--verifiers", "2", "--no-dsi", "--verify-queue", "rpc"]),
       ("1 verifier", ["--no-adaptive"]))


def ablation(models_dir: Path, redis_url: str, prefix: str, prompts: list[list[int]], new_tokens: int,
             concurrency: int, bar, systems=ABLATION) -> list[dict]:
    """Each system on the same prompts: greedy and sampled, `concurrency` streams at a time; ratios against the
    first system."""
    from specfleet.training.acceptance import distinct_n

    rows = []
    for name, flags in systems:
        with fleet_processes(models_dir, redis_url, f"{prefix}-a{len(rows)}", concurrency + 8, flags) as fleet:
            row: dict = {"system": name, "flags": " ".join(flags)}
            for mode, sampling in (("greedy", {}), ("sampled", SAMPLED)):
                usage: dict = {}

                async def wave(batch, usage=usage, sampling=sampling):
                    return await asyncio.gather(*(_stream(fleet, ids, new_tokens, usage, seed=j, **sampling)
                                                  for j, ids in batch))

                asyncio.run(wave(list(enumerate(prompts[:2]))))  # warm-up: caches, channels, cost model
                usage.clear()
                outs, start = [], time.perf_counter()
                indexed = list(enumerate(prompts))
                for i in range(0, len(indexed), concurrency):
                    outs += [t for t, _ in asyncio.run(wave(indexed[i:i + concurrency]))]
                seconds = time.perf_counter() - start
                tokens = sum(map(len, outs))
                row[mode] = {"tokens_per_s": round(tokens / seconds, 2),
                             "tokens_per_round": round(tokens / max(1, usage.get("rounds", 0)), 3),
                             "accepted_per_round": round(usage.get("accepted_tokens", 0) / max(1, usage["rounds"]), 3),
                             "draft_tokens_per_round": round(usage.get("draft_tokens", 0) / max(1, usage["rounds"]), 2),
                             "distinct_4": round(distinct_n(outs, 4), 3), "outputs": outs}
            bar.update()
        rows.append(row)
    base = rows[0]
    for row in rows:
        for mode in ("greedy", "sampled"):
            r, b = row[mode], base[mode]
            r["accepted_vs_k_fixed"] = round(r["accepted_per_round"] / max(b["accepted_per_round"], 1e-9), 3)
            r["throughput_vs_k_fixed"] = round(r["tokens_per_s"] / max(b["tokens_per_s"], 1e-9), 3)
            r["identical_to_k_fixed"] = f"{sum(a == c for a, c in zip(r['outputs'], b['outputs'], strict=True))}/" \
                                       f"{len(b['outputs'])}"
    for row in rows:
        for mode in ("greedy", "sampled"):
            row[mode].pop("outputs")
    return rows


def run(models_dir: Path, redis_url: str, new_tokens: int, limit: int, output: Path,
        concurrency: tuple[int, ...] = (1, 8, 32), progress: bool = True,
        stages: tuple[str, ...] = ("overhead", "throughput", "ablation"), ablation_concurrency: int = 8,
        dsi_concurrency: tuple[int, ...] = (1, 8), hop_models: tuple[str, ...] = ("bundled", "tiny"),
        hop_concurrency: tuple[int, ...] = (1, 8), baseline: dict | None = None) -> dict:
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
    steps = (3 + len(hop_models)) * ("overhead" in stages) + 2 * len(concurrency) * ("throughput" in stages) + \
        len(ABLATION) * ("ablation" in stages) + len(DSI) * len(dsi_concurrency) * ("dsi" in stages)
    bar = tqdm(total=steps, desc="bench fleet", unit="step", disable=not progress)
    results: dict = {"config": {"prompts": len(prompts), "max_new_tokens": new_tokens, "redis": redis_url,
                                "pools": list(SYSTEM_POOLS), "fleet": "specfleet up: one process per service",
                                "cpu_count": os.cpu_count()}}

    slots = max(concurrency) + 8
    if "overhead" in stages:
        # 1. per-round overhead: plain decoding through the engine and through the fleet
        engine = build_engine(models_dir, "none", batch_size=1, target=target)
        engine_rounds: list[float] = []
        engine_tokens, engine_start = 0, time.perf_counter()
        for i, ids in enumerate(prompts):
            stamps = [time.perf_counter()]

            def stamp(rid, new, stamps=stamps):
                stamps.append(time.perf_counter())

            engine_tokens += len(engine.generate([Request(f"e{i}", ids, new_tokens)], on_tokens=stamp)[0].token_ids)
            engine_rounds += [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
        engine_plain_tps = engine_tokens / (time.perf_counter() - engine_start)
        bar.update()
        base = statistics.median(engine_rounds)
        # the default verify queue (the Redis stream) and straight gRPC calls to the verifier
        for key, flags in (("round_overhead_ms", []), ("round_overhead_ms_rpc", ["--verify-queue", "rpc"])):
            with fleet_processes(models_dir, redis_url, prefix, slots, ["--k", "0", "--no-adaptive", *flags]) as plain:
                fleet_rounds: list[float] = []
                for ids in prompts:
                    _, stamps = asyncio.run(_stream(plain, ids, new_tokens))
                    fleet_rounds += [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
            bar.update()
            overhead = [r - base for r in fleet_rounds]
            results[key] = {"verify_queue": "rpc" if flags else "stream", "engine_round_p50": round(base * 1e3, 3),
                            # plain decoding at batch 1 in this same run (the simulator's check)
                            "engine_plain_tokens_per_s": round(engine_plain_tps, 2),
                            "fleet_round_p50": round(statistics.median(fleet_rounds) * 1e3, 3),
                            "p50": round(_percentile(overhead, 0.5) * 1e3, 3),
                            "p99": round(_percentile(overhead, 0.99) * 1e3, 3)}
        results["round_hops"] = round_hops(models_dir, redis_url, prefix, prompts, new_tokens, hop_models,
                                           hop_concurrency, slots, bar)
        if baseline is not None:
            results["before"] = compare_hops(baseline, results["round_hops"])

    rows = []
    if "throughput" in stages:
        # 2. throughput at each concurrency, speculation on in both
        with fleet_processes(models_dir, redis_url, prefix + "-t", slots, []) as fleet:
            for c in concurrency:
                batch = [prompts[i % len(prompts)] for i in range(c)]
                eng = build_engine(models_dir, "fused", SYSTEM_POOLS[:-1], batch_size=c, target=target)
                start = time.perf_counter()
                outs = eng.generate([Request(f"t{c}-{i}", ids, new_tokens) for i, ids in enumerate(batch)])
                engine_s = time.perf_counter() - start
                bar.update()

                usage: dict = {}

                async def all_streams(batch=batch, usage=usage):
                    return await asyncio.gather(*(_stream(fleet, ids, new_tokens, usage) for ids in batch))

                start = time.perf_counter()
                streams = asyncio.run(all_streams())
                fleet_s = time.perf_counter() - start
                bar.update()
                tokens = sum(len(o.token_ids) for o in outs)
                fleet_tokens = sum(len(s[0]) for s in streams)
                same = sum(list(s[0]) == o.token_ids for s, o in zip(streams, outs, strict=True))
                rounds = max(1, sum(o.stats["rounds"] for o in outs))
                rows.append({"concurrency": c, "engine_tokens_per_s": round(tokens / engine_s, 2),
                             "fleet_tokens_per_s": round(fleet_tokens / fleet_s, 2),
                             "fleet_vs_engine": round(fleet_tokens / fleet_s / (tokens / engine_s), 3),
                             "identical_outputs": f"{same}/{c}",
                             # the engine's own round shape (its suffix tree drafts every greedy round, the fleet's
                             # router does not): what the simulator's reproduction replays the engine with
                             "engine_rounds": {
                                 "accepted_per_round": round(sum(o.stats["accepted_tokens"] for o in outs) / rounds, 3),
                                 "draft_tokens_per_round": round(sum(o.stats["draft_tokens"] for o in outs) / rounds,
                                                                 3)},
                             # and the fleet's own at this concurrency (its adaptive control speculates in a share
                             # of the rounds that differs with the concurrency): the reproduction's fleet rows
                             "fleet_rounds": {
                                 "accepted_per_round": round(usage.get("accepted_tokens", 0)
                                                             / max(1, usage.get("rounds", 0)), 3),
                                 "draft_tokens_per_round": round(usage.get("draft_tokens", 0)
                                                                 / max(1, usage.get("rounds", 0)), 3)}})
        results["throughput"] = rows
    if "ablation" in stages:
        results["ablation"] = {"concurrency": ablation_concurrency, "prompts": len(prompts),
                               "sampled": SAMPLED, "systems": ablation(models_dir, redis_url, prefix, prompts,
                                                                       new_tokens, ablation_concurrency, bar)}
    if "dsi" in stages:
        results["dsi"] = [{"concurrency": c, "prompts": len(prompts), "sampled": SAMPLED,
                           "systems": ablation(models_dir, redis_url, f"{prefix}-d{c}", prompts, new_tokens, c, bar,
                                               DSI)} for c in dsi_concurrency]
    bar.close()
    for suffix in ("", "-t", *(f"-h{m}" for m in hop_models), *(f"-a{i}" for i in range(len(ABLATION))),
                   *(f"-d{c}-a{i}" for c in dsi_concurrency for i in range(len(DSI)))):
        delete_prefix(redis_url, prefix + suffix)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    return results


def round_hops(models_dir: Path, redis_url: str, prefix: str, prompts: list[list[int]], new_tokens: int,
               hop_models: tuple[str, ...], concurrency: tuple[int, ...], slots: int, bar) -> dict:
    """The round trip hop by hop (`bench.overhead`) on each model set: the bundled models and/or the smallest ones
    (built into a temporary folder), each fleet streaming the prompts `c` at a time for each c; every output
    checked against the target's own plain decoding."""
    import tempfile

    from specfleet.bench.overhead import HOP_FLAGS, HOPS, SUMMARY, profile, tiny_models
    from specfleet.engine.engine import Request
    from specfleet.engine.factory import build_engine

    out: dict = {"hops": {h: f"{kind}: {what}" for h, kind, what in HOPS} | {s: what for s, what in SUMMARY}}
    for name in hop_models:
        with tempfile.TemporaryDirectory(prefix="specfleet-tiny-") as tmp:
            models = models_dir if name == "bundled" else tiny_models(models_dir, Path(tmp))
            engine = build_engine(models, "none", batch_size=8)
            refs = [r.token_ids for r in engine.generate([Request(f"h{i}", ids, new_tokens, ignore_eos=True)
                                                          for i, ids in enumerate(prompts)])]
            del engine
            entry = {"models": "models/ (bundled)" if name == "bundled" else
                     "1-layer Llama, hidden 64, random weights, bundled tokenizer (target and python/prose/c "
                     "drafters)", "flags": HOP_FLAGS, "runs": []}
            with fleet_processes(models, redis_url, f"{prefix}-h{name}", slots, HOP_FLAGS) as fleet:
                for c in concurrency:
                    run = profile(fleet, prompts, new_tokens, c)
                    outs = run.pop("outputs")
                    run["identical_outputs"] = f"{sum(a == b for a, b in zip(outs, refs, strict=True))}/{len(refs)}"
                    entry["runs"].append(run)
        out[name] = entry
        bar.update()
    return out


def compare_hops(baseline: dict, now: dict) -> dict:
    """A previous report's hop tables beside this one's: [before, now] p50 and p99 per hop (ms), and its plain
    decoding overhead figures."""
    old = baseline.get("round_hops", {})
    out: dict = {key: baseline[key] for key in ("round_overhead_ms", "round_overhead_ms_rpc") if key in baseline}
    for name, entry in now.items():
        if name == "hops" or name not in old:
            continue
        runs = {r["concurrency"]: r for r in old[name]["runs"]}
        for run in entry["runs"]:
            before = runs.get(run["concurrency"])
            if before is None:
                continue
            out[f"{name}, c={run['concurrency']}"] = {
                hop: {"p50": [before["hops_ms"][hop]["p50"], figures["p50"]],
                      "p99": [before["hops_ms"][hop]["p99"], figures["p99"]]}
                for hop, figures in run["hops_ms"].items() if hop in before["hops_ms"]}
    return out


def delete_prefix(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def format_table(report: dict) -> str:
    from specfleet.bench.overhead import format_hops

    lines = []
    for key in ("round_overhead_ms", "round_overhead_ms_rpc"):
        if key in report:
            o = report[key]
            lines += [f"per-round fleet overhead (gRPC + Redis, verify queue {o.get('verify_queue', 'rpc')}): p50 "
                      f"{o['p50']:.2f} ms, p99 {o['p99']:.2f} ms (engine round {o['engine_round_p50']:.2f} ms, fleet "
                      f"round {o['fleet_round_p50']:.2f} ms)"]
    for name in ("bundled", "tiny"):
        if name in report.get("round_hops", {}):
            lines += [""] + format_hops(name, report["round_hops"][name])
    lines.append("")
    if report.get("throughput"):
        lines.append(f"{'concurrency':>12}{'engine tok/s':>14}{'fleet tok/s':>13}{'fleet/engine':>14}{'identical':>11}")
        for r in report["throughput"]:
            lines.append(f"{r['concurrency']:>12}{r['engine_tokens_per_s']:>14.1f}{r['fleet_tokens_per_s']:>13.1f}"
                         f"{r['fleet_vs_engine']:>13.2f}x{r['identical_outputs']:>11}")
    sections = []
    if "ablation" in report:
        a = report["ablation"]
        sections.append((a, f"CoSine ablation: {a['prompts']} mixed-domain held-out prompts, {a['concurrency']} "
                            "streams at a time; accepted = drafted tokens accepted per round, x = against 'cosine, "
                            "k fixed'"))
    for a in report.get("dsi", []):
        sections.append((a, f"DSI speculation parallelism: {a['prompts']} prompts, {a['concurrency']} streams at a "
                            f"time; x = against '{a['systems'][0]['system']}'"))
    for a, title in sections:
        lines += ["", title]
        lines.append(f"{'system':<34}{'mode':<9}{'tok/s':>8}{'x':>7}{'accepted':>10}{'x':>7}{'distinct-4':>12}"
                     f"{'same out':>10}")
        for row in a["systems"]:
            for mode in ("greedy", "sampled"):
                r = row[mode]
                lines.append(f"{row['system']:<34}{mode:<9}{r['tokens_per_s']:>8.1f}{r['throughput_vs_k_fixed']:>7.2f}"
                             f"{r['accepted_per_round']:>10.2f}{r['accepted_vs_k_fixed']:>7.2f}{r['distinct_4']:>12.2f}"
                             f"{r['identical_to_k_fixed']:>10}")
    return "\n".join(lines)
