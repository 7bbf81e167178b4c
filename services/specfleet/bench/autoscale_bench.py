"""`specfleet bench autoscale`: a load ramp up and down on the local fleet (`specfleet up --autoscale`, the operator's
control loop driving local processes). Records replicas per role over time (from Redis heartbeats), every request's
latency and outcome, the scaling actions, and the verifier queue wait against its target; checks that no request
was lost and every output equals the target's greedy decoding. Writes JSON and a PNG plot."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from specfleet.bench.fleet_bench import delete_prefix
from specfleet.state.embedded import free_port

DEFAULT_RAMP = (1, 4, 12, 12, 4, 1, 0, 0)  # concurrent clients per phase
QUEUE_WAIT_TARGET_MS = 50.0  # the SpecFleet default target (spec.autoscaling.targets.queueWaitMs)


@contextlib.contextmanager
def autoscaling_fleet(models_dir: Path, redis_url: str, prefix: str, pools: str, max_verifiers: int,
                      interval_s: float, log_lines: list[str]):
    port = free_port()
    cmd = [sys.executable, "-m", "specfleet.cli", "up", "--autoscale", "--grpc-port", str(port), "--http-port", "-1",
           "--models", str(models_dir), "--redis-url", redis_url, "--key-prefix", prefix, "--pools", pools,
           "--max-verifiers", str(max_verifiers), "--autoscale-interval", str(interval_s), "--slots", "32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            log_lines.append(f"{time.time():.3f} {line.rstrip()}")
            if "specfleet is up" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not ready.wait(0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("specfleet up --autoscale did not start:\n" + "\n".join(log_lines[-30:]))
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def _sampler(redis_url: str, prefix: str, t0: float, stop: asyncio.Event, samples: list[dict]) -> None:
    from specfleet.state import StateStore, connect

    store = StateStore(connect(redis_url), prefix=prefix)
    try:
        while not stop.is_set():
            beats = await store.heartbeats()
            roles: dict[str, int] = {}
            draining: dict[str, int] = {}
            waits = []
            for b in beats:
                key = f"drafter-{b.get('pool')}" if b["role"] == "drafter" else b["role"]
                roles[key] = roles.get(key, 0) + 1
                draining[key] = draining.get(key, 0) + bool(b.get("draining"))
                if b["role"] == "verifier":
                    waits.append(float(b.get("queue_wait_p99_ms") or 0.0))
            samples.append({"t": round(time.time() - t0, 2), "replicas": roles, "draining": draining,
                            "verifier_queue_wait_p99_ms": round(max(waits, default=0.0), 2)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await store.redis.aclose()


async def _load(address: str, prompts: list[list[int]], refs: list[list[int]], new_tokens: int, ramp, phase_s: float,
                t0: float, load_log: list[dict], requests: list[dict], until=()) -> None:
    import grpc

    from specfleet.api.v1 import router_pb2, router_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def client(i: int, over) -> None:
            n = 0
            while not over():
                j = (i + n) % len(prompts)
                n += 1
                record = {"t": round(time.time() - t0, 2), "client": i, "prompt": j, "ok": False, "same": False}
                start = time.perf_counter()
                try:
                    reply = await stub.Complete(router_pb2.GenerateRequest(
                        request_id=uuid.uuid4().hex, prompt_token_ids=prompts[j], max_new_tokens=new_tokens),
                        timeout=120)
                    record.update(ok=True, same=list(reply.token_ids) == refs[j])
                except grpc.aio.AioRpcError as exc:
                    record["error"] = f"{exc.code().name}: {exc.details()}"
                record["latency_s"] = round(time.perf_counter() - start, 3)
                requests.append(record)

        for phase, clients in enumerate(ramp):
            end = time.time() + phase_s
            done = until[phase] if phase < len(until) else None

            def over(end=end, done=done) -> bool:  # phase_s is the phase's length, or its bound when it has `until`
                return time.time() >= end or (done is not None and done())

            load_log.append({"t": round(time.time() - t0, 2), "clients": clients})
            if clients:
                await asyncio.gather(*(client(i, over) for i in range(clients)))
            else:
                while not over():
                    await asyncio.sleep(0.25)


def run(models_dir: Path, redis_url: str, output: Path, ramp=DEFAULT_RAMP, phase_s: float = 20.0,
        new_tokens: int = 24, pools: str = "suffix", max_verifiers: int = 3, interval_s: float = 1.0,
        until=()) -> dict:
    """`until`: optional per-phase predicates over (log lines, timeline samples); a phase with one ends as soon as it
    holds (phase_s then only bounds it), so a test waits on what it checks instead of sleeping fixed phases."""
    import torch
    from transformers import AutoTokenizer

    from specfleet.bench.engine_bench import load_prompts
    from specfleet.engine.factory import load_model

    tok = AutoTokenizer.from_pretrained(str(models_dir / "target"))
    prompts = [p.ids for p in load_prompts(tok, None, 12, 48)]
    target = load_model(models_dir, "target")
    with torch.no_grad():
        refs = [target.generate(torch.tensor([p]), do_sample=False, max_new_tokens=new_tokens,
                                pad_token_id=tok.pad_token_id)[0, len(p):].tolist() for p in prompts]
    del target
    prefix = f"sfbench-as-{uuid.uuid4().hex[:8]}"
    log_lines: list[str] = []
    samples: list[dict] = []
    load_log: list[dict] = []
    requests: list[dict] = []
    with autoscaling_fleet(models_dir, redis_url, prefix, pools, max_verifiers, interval_s, log_lines) as address:
        t0 = time.time()

        async def main() -> None:
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sampler(redis_url, prefix, t0, stop, samples))
            checks = [None if p is None else (lambda p=p: p(log_lines, samples)) for p in until]
            await _load(address, prompts, refs, new_tokens, ramp, phase_s, t0, load_log, requests, checks)
            stop.set()
            await sampler

        asyncio.run(main())
    actions = []
    for line in log_lines:
        stamp, _, text = line.partition(" ")
        m = re.search(r"autoscale \| (.*)", text)
        if m:
            actions.append({"t": round(float(stamp) - t0, 2), "action": m.group(1)})
    waits = [s["verifier_queue_wait_p99_ms"] for s in samples]
    latencies = sorted(r["latency_s"] for r in requests if r["ok"])
    peak: dict[str, int] = {}
    for s in samples:
        for role, n in s["replicas"].items():
            peak[role] = max(peak.get(role, 0), n)
    report = {
        "config": {"pools": pools, "max_verifiers": max_verifiers, "autoscale_interval_s": interval_s,
                   "ramp_clients": list(ramp), "phase_s": phase_s, "max_new_tokens": new_tokens,
                   "cpu_count": os.cpu_count(), "queue_wait_target_ms": QUEUE_WAIT_TARGET_MS},
        "requests": len(requests), "requests_ok": sum(r["ok"] for r in requests),
        "requests_lost": sum(not r["ok"] for r in requests),
        "outputs_differing_from_target": sum(r["ok"] and not r["same"] for r in requests),
        "scaling_decisions": sum("replicas (" in a["action"] for a in actions),
        "scaling_actions": actions,
        "peak_replicas": peak,
        "latency_s": {"p50": latencies[len(latencies) // 2] if latencies else None,
                      "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None},
        "verifier_queue_wait_p99_ms": {"max": max(waits, default=0.0),
                                       "share_of_samples_over_target": round(
                                           sum(w > QUEUE_WAIT_TARGET_MS for w in waits) / max(1, len(waits)), 3)},
        "timeline": samples, "load": load_log,
        "errors": sorted({r["error"] for r in requests if not r["ok"]})[:10],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, output.with_suffix(".png"))
    delete_prefix(redis_url, prefix)
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    times = [s["t"] for s in report["timeline"]]
    roles = sorted({r for s in report["timeline"] for r in s["replicas"]})
    for role in roles:
        top.step(times, [s["replicas"].get(role, 0) for s in report["timeline"]], where="post", label=role)
    load_t = [p["t"] for p in report["load"]] + [times[-1] if times else 0]
    top.step(load_t, [p["clients"] for p in report["load"]] + [report["load"][-1]["clients"] if report["load"] else 0],
             where="post", color="gray", linestyle=":", label="clients (load)")
    top.set_ylabel("replicas / clients")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(f"specfleet up --autoscale: {report['requests']} requests, lost {report['requests_lost']}, "
                  f"{report['scaling_decisions']} scaling decisions")
    bottom.plot(times, [s["verifier_queue_wait_p99_ms"] for s in report["timeline"]], label="verifier queue wait p99")
    bottom.axhline(report["config"]["queue_wait_target_ms"], color="red", linestyle="--", label="target")
    bottom.set_ylabel("ms")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(report: dict) -> str:
    lines = [f"requests {report['requests']}, ok {report['requests_ok']}, lost {report['requests_lost']}, outputs "
             f"differing from the target {report['outputs_differing_from_target']}",
             f"scaling decisions {report['scaling_decisions']}, peak replicas {report['peak_replicas']}",
             f"latency p50 {report['latency_s']['p50']} s, p99 {report['latency_s']['p99']} s; verifier queue wait "
             f"p99 max {report['verifier_queue_wait_p99_ms']['max']} ms (target "
             f"{report['config']['queue_wait_target_ms']} ms, over it in "
             f"{report['verifier_queue_wait_p99_ms']['share_of_samples_over_target']:.0%} of samples)"]
    lines += [f"  t={a['t']:>6.1f}s  {a['action']}" for a in report["scaling_actions"]]
    return "\n".join(lines)
