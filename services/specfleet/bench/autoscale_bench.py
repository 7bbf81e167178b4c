"""`specfleet bench autoscale`: load on the local fleet (`specfleet up --autoscale`, the operator's control loop driving
local processes) in two stages: a ramp of concurrent clients up and down, and a burst (a low base load, a sudden jump
to many times as many clients, and back). Records replicas per role over time (from Redis heartbeats), every
request's latency and outcome, the scaling decisions, and the verifier queue wait against its target; per stage it
reports reversals per role and the queue wait's share over target, p50 and p99, and for the burst the time from its
start to the first scale-up decision (`bench.autoscale_timeline` computes these from the recording). Checks that no
request was lost and every output equals the target's greedy decoding. Writes JSON and a PNG plot."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from specfleet.bench.autoscale_timeline import (
    burst_summary,
    decisions,
    parse_actions,
    percentile,
    reversals_per_role,
    stage_summary,
)
from specfleet.bench.fleet_bench import delete_prefix
from specfleet.state.embedded import free_port

DEFAULT_RAMP = (1, 4, 12, 12, 4, 1, 0, 0)  # concurrent clients per phase
DEFAULT_BURST = (1, 12)  # the burst: base clients, then 12x as many at once
DEFAULT_BURST_S = (20.0, 30.0, 20.0)  # seconds of base load (at least), of the burst, of base load after
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
            waits, means, busy, depth, ages = [], [], [], 0, []
            for b in beats:
                key = f"drafter-{b.get('pool')}" if b["role"] == "drafter" else b["role"]
                roles[key] = roles.get(key, 0) + 1
                draining[key] = draining.get(key, 0) + bool(b.get("draining"))
                if b["role"] == "verifier":
                    waits.append(float(b.get("queue_wait_p99_ms") or 0.0))
                    depth += int(b.get("queue_depth") or 0)
                    ages.append(float(b.get("age_s") or 0.0))
                    if not b.get("draining"):
                        means.append(float(b.get("queue_wait_ms") or 0.0))
                        busy.append(float(b.get("busy_frac") or 0.0))
            # the p99 of each verifier's recent waits (worst verifier), and the mean wait over the last heartbeat
            # interval across serving verifiers: what the policy scales on
            samples.append({"t": round(time.time() - t0, 2), "replicas": roles, "draining": draining,
                            "verifier_queue_wait_p99_ms": round(max(waits, default=0.0), 2),
                            "verifier_queue_wait_ms": round(sum(means) / len(means), 2) if means else 0.0,
                            # where a decision's latency comes from: the verifiers' busy fraction and queue, and how
                            # old their newest heartbeats are (a starved process beats late)
                            "verifier_busy": round(sum(busy) / len(busy), 3) if busy else 0.0,
                            "verifier_queue_depth": depth, "verifier_heartbeat_age_s": round(max(ages, default=0), 2)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await store.redis.aclose()


@dataclass(frozen=True)
class Phase:
    """One phase of load: `clients` concurrent clients for at most `max_s` seconds; with `until` (a predicate over
    (log lines, timeline samples)) it ends as soon as that holds, once `min_s` have passed."""

    stage: str
    clients: int
    max_s: float
    until: Callable[[list[str], list[dict]], bool] | None = None
    min_s: float = 0.0


def ramp_phases(ramp, phase_s: float, until=()) -> list[Phase]:
    return [Phase("ramp", clients, phase_s, until[i] if i < len(until) else None) for i, clients in enumerate(ramp)]


def burst_phases(base: int, peak: int, base_s: float, peak_s: float, after_s: float, settle_s: float,
                 min_verifiers: int = 1) -> list[Phase]:
    """The burst: `base` clients until the verifiers have settled at their minimum (at least `base_s`, at most
    `base_s + settle_s`: a preceding ramp's pods and its remembered burst size take a while to go), `peak` clients
    for `peak_s`, `base` again for `after_s`."""
    def settled(lines: list[str], samples: list[dict]) -> bool:
        last = samples[-3:]
        return len(last) == 3 and all(s["replicas"].get("verifier", 0) <= min_verifiers
                                      and not s["draining"].get("verifier") for s in last)

    return [Phase("burst", base, base_s + settle_s, settled, min_s=base_s), Phase("burst", peak, peak_s),
            Phase("burst", base, after_s)]


async def _load(address: str, prompts: list[list[int]], refs: list[list[int]], new_tokens: int,
                phases: list[Phase], t0: float, load_log: list[dict], requests: list[dict],
                log_lines: list[str], samples: list[dict]) -> None:
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

        for phase in phases:
            began = time.time()

            def over(phase=phase, began=began) -> bool:  # max_s bounds a phase with `until`
                now = time.time()
                return now >= began + phase.max_s or (
                    phase.until is not None and now >= began + phase.min_s and phase.until(log_lines, samples))

            load_log.append({"t": round(began - t0, 2), "clients": phase.clients, "stage": phase.stage})
            if phase.clients:
                await asyncio.gather(*(client(i, over) for i in range(phase.clients)))
            else:
                while not over():
                    await asyncio.sleep(0.25)


def run(models_dir: Path, redis_url: str, output: Path, ramp=DEFAULT_RAMP, phase_s: float = 20.0,
        new_tokens: int = 24, pools: str = "suffix", max_verifiers: int = 3, interval_s: float = 1.0,
        until=(), stages=("burst", "ramp"), burst=DEFAULT_BURST, burst_s=DEFAULT_BURST_S,
        settle_s: float = 60.0) -> dict:
    """`until`: optional per-phase predicates of the ramp over (log lines, timeline samples); a phase with one ends
    as soon as it holds (phase_s then only bounds it), so a test waits on what it checks instead of sleeping fixed
    phases. `burst`: (base, peak) clients; `burst_s`: seconds of base load (at least; it also waits up to
    `settle_s` more for the verifiers to settle at one), of the peak, and of base load after it. `stages` run in the
    order given; the burst first (the default) meets a fresh fleet at its minimum, with no burst remembered."""
    unknown = set(stages) - {"ramp", "burst"}
    if unknown or not stages:
        raise ValueError(f"stages are ramp and burst; got {','.join(stages) or 'none'}")
    base, peak = burst
    if "burst" in stages and not 1 <= base < peak:
        raise ValueError(f"a burst jumps from a base load of at least 1 client to more: got {base} -> {peak}")
    if "burst" in stages and (len(burst_s) != 3 or min(burst_s) <= 0):
        raise ValueError(f"burst_s wants three positive durations (base, peak, after), got {burst_s}")
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
    if len(set(stages)) != len(stages):
        raise ValueError(f"each stage runs once; got {','.join(stages)}")
    phases = [phase for stage in stages for phase in (
        ramp_phases(ramp, phase_s, until) if stage == "ramp" else burst_phases(base, peak, *burst_s, settle_s))]
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
            await _load(address, prompts, refs, new_tokens, phases, t0, load_log, requests, log_lines, samples)
            stop.set()
            await sampler

        asyncio.run(main())
        end = round(time.time() - t0, 2)
    actions = parse_actions(log_lines, t0)
    made = decisions(actions)
    waits = [s["verifier_queue_wait_p99_ms"] for s in samples]
    latencies = sorted(r["latency_s"] for r in requests if r["ok"])
    peak_replicas: dict[str, int] = {}
    for s in samples:
        for role, n in s["replicas"].items():
            peak_replicas[role] = max(peak_replicas.get(role, 0), n)
    report = {
        "config": {"pools": pools, "max_verifiers": max_verifiers, "autoscale_interval_s": interval_s,
                   "stages": list(stages), "ramp_clients": list(ramp), "phase_s": phase_s,
                   "burst_clients": list(burst), "burst_s": list(burst_s), "burst_settle_s": settle_s,
                   "max_new_tokens": new_tokens, "cpu_count": os.cpu_count(),
                   "queue_wait_target_ms": QUEUE_WAIT_TARGET_MS},
        "requests": len(requests), "requests_ok": sum(r["ok"] for r in requests),
        "requests_lost": sum(not r["ok"] for r in requests),
        "outputs_differing_from_target": sum(r["ok"] and not r["same"] for r in requests),
        "scaling_decisions": len(made),
        "scaling_actions": actions,
        "peak_replicas": peak_replicas,
        "latency_s": {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99)},
        "verifier_queue_wait_p99_ms": {"max": max(waits, default=0.0),
                                       "share_of_samples_over_target": round(
                                           sum(w > QUEUE_WAIT_TARGET_MS for w in waits) / max(1, len(waits)), 3)},
        "reversals": reversals_per_role(made),
    }
    # each stage's window: from its first phase to the next stage's (or the end)
    starts = [next(p["t"] for p in load_log if p["stage"] == stage) for stage in stages]
    for stage, start, until in zip(stages, starts, [*starts[1:], end], strict=True):
        if stage == "ramp":
            report["ramp"] = stage_summary("ramp", start, until, samples, requests, load_log, made,
                                           QUEUE_WAIT_TARGET_MS)
        else:
            burst_log = [p for p in load_log if p["stage"] == "burst"]
            report["burst"] = burst_summary(start, until, burst_log[1]["t"], burst_log[2]["t"], samples, requests,
                                            load_log, made, QUEUE_WAIT_TARGET_MS)
    report.update(timeline=samples, load=load_log,
                  errors=sorted({r["error"] for r in requests if not r["ok"]})[:10])
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
    bottom.plot(times, [s.get("verifier_queue_wait_ms", 0.0) for s in report["timeline"]],
                label="verifier queue wait (interval mean, the policy's signal)")
    bottom.set_yscale("symlog", linthresh=10)
    if "burst" in report:
        for axis in (top, bottom):
            axis.axvspan(report["burst"]["burst_start_s"], report["burst"]["burst_end_s"], color="orange", alpha=0.15,
                         label="burst" if axis is top else None)
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
    for name in ("ramp", "burst"):
        if name not in report:
            continue
        stage = report[name]
        mean, p99 = stage["verifier_queue_wait_ms"], stage["verifier_queue_wait_p99_ms"]
        lines.append(f"{name} (clients {stage['clients']}, t {stage['start_s']}-{stage['end_s']} s): "
                     f"{stage['requests']} requests, {len(stage['scaling_decisions'])} decisions, reversals "
                     f"{stage['reversals']} (at constant load {stage['reversals_at_constant_load']}); verifier queue "
                     f"wait over target in {mean['share_of_samples_over_target']:.0%} of samples (interval mean, p50 "
                     f"{mean['p50']} ms, p99 {mean['p99']} ms), p99 of recent waits over it in "
                     f"{p99['share_of_samples_over_target']:.0%} (p50 {p99['p50']} ms, p99 {p99['p99']} ms)")
    if "burst" in report:
        burst = report["burst"]
        lines.append(f"burst: {burst['clients'][0]} -> {burst['clients'][1]} clients at t={burst['burst_start_s']} s "
                     f"with replicas {burst['replicas_at_burst_start']}; first scale-up decision after "
                     f"{burst['burst_to_scale_up_s']} s (per role {burst['burst_to_scale_up_s_per_role']})")
    lines += [f"  t={a['t']:>6.1f}s  {a['action']}" for a in report["scaling_actions"]]
    return "\n".join(lines)
