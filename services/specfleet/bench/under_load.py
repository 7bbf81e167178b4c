"""Faults under load (`specfleet bench reliability --under-load`): many concurrent streams, greedy and seeded sampled
mixed, first without a fault, then once per fault (`fault_actions` below, which the single-stream runs use too)
injected mid-run while every stream is live. Each request's output is compared with its own output in the fault-free
run (a seeded sample is reproducible: the sampling stream is keyed by seed and output position, whoever drafted), and
each request is held to its deadline + 5 s: by then it must have ended with all its tokens or with a typed, retryable
error."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

SDK_RETRIES, SDK_BACKOFF_S = 12, 0.5  # the SDK's retries while a fault is injected (shared with reliability)


def percentile_ms(ordered: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of sorted seconds, in milliseconds; None for no values."""
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000, 1)


def fault_actions(fleet: Any) -> dict[str, tuple]:
    """name -> (inject, recover): `inject` runs mid-stream; `recover` runs after the stream (restart / SIGCONT)."""
    drafter = next(n for n in fleet.services if n.startswith("drafter-"))
    actions = {
        f"kill -9 {drafter}": (lambda: fleet.signal(drafter, signal.SIGKILL), lambda: fleet.restart(drafter)),
        "kill -9 verifier-0": (lambda: fleet.signal("verifier-0", signal.SIGKILL),
                               lambda: fleet.restart("verifier-0")),
        "SIGSTOP verifier-1": (lambda: fleet.signal("verifier-1", signal.SIGSTOP),
                               lambda: fleet.signal("verifier-1", signal.SIGCONT)),
        # the router is the stream's own server: a new one on the same port resumes it from Redis
        "kill -9 router": (lambda: (fleet.signal("router", signal.SIGKILL), fleet.restart("router")), lambda: None),
    }
    if "fusion" in fleet.services:
        actions["kill -9 fusion"] = (lambda: fleet.signal("fusion", signal.SIGKILL), lambda: fleet.restart("fusion"))
    if fleet.redis is not None:  # the fleet's own persistent Redis: SIGTERM and a new one on the same port and dir
        actions["restart redis (appendonly)"] = (fleet.redis.restart, lambda: None)
    return actions



GRACE_S = 5.0  # how long past its deadline a request may take to end
SAMPLED = {"temperature": 0.8, "top_p": 0.95}  # as the engine benchmark's sampled rows


@dataclass(frozen=True)
class LoadRequest:
    """One stream's request; the same in every run, so each output has a fault-free twin."""

    prompt: list[int]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Outcome:
    """How one request ended in one run."""

    tokens: list[int]
    seconds: float
    finished: bool = False  # the stream's finished message arrived
    error_code: str = ""  # the SDK's typed error (grpc status name), "" when none
    error: str = ""
    retryable: bool = False
    in_time: bool = False  # ended (finished, or a typed retryable error) within the deadline + GRACE_S


def mixed_requests(prompts: list[list[int]], streams: int, seed: int = 0) -> list[LoadRequest]:
    """One request per stream, round-robin over `prompts`, greedy and sampled (SAMPLED, a seed of their own) in
    turn; the turn flips at each pass over the prompts, so every prompt is sent both ways."""
    return [LoadRequest(prompts[i % len(prompts)]) if (i % len(prompts) + i // len(prompts)) % 2 == 0
            else LoadRequest(prompts[i % len(prompts)], SAMPLED["temperature"], SAMPLED["top_p"], seed * 100_003 + i)
            for i in range(streams)]


def run_streams(fleet: Any, requests: list[LoadRequest], new_tokens: int, deadline_s: float,
                fault: tuple | None = None, inject_at_tokens: int = 0, outage_s: float = 5.0) -> tuple[list, dict]:
    """Every request at once through one SDK client (retries resume by request id). With `fault` (inject, recover),
    it is injected once the streams together hold `inject_at_tokens` tokens, and recovered `outage_s` later while
    the streams go on. Each SDK attempt's deadline is `deadline_s`; the harness stops waiting for a request at
    deadline + GRACE_S from its start. Returns the outcomes (in request order) and when the fault came and went."""
    from specfleet.sdk import AsyncClient, SpecfleetError
    from specfleet.sdk.core import is_retryable

    outcomes: list[Outcome | None] = [None] * len(requests)
    delivered, live = 0, 0
    trigger = asyncio.Event()
    timing: dict = {"injected": False}

    async def one(i: int, sdk, start: float) -> None:
        nonlocal delivered, live
        request, tokens = requests[i], []
        outcome = Outcome(tokens, 0.0)

        async def consume() -> None:
            nonlocal delivered
            async for chunk in sdk.generate(prompt_token_ids=request.prompt, max_new_tokens=new_tokens,
                                            temperature=request.temperature, top_p=request.top_p, seed=request.seed):
                tokens.extend(chunk.token_ids)
                delivered += len(chunk.token_ids)
                outcome.finished = chunk.finished
                if fault is not None and delivered >= inject_at_tokens and not trigger.is_set():
                    timing.update(injected_after_tokens=delivered, live_at_injection=live - chunk.finished)
                    trigger.set()

        live += 1
        try:
            await asyncio.wait_for(consume(), deadline_s + GRACE_S)
            outcome.in_time = outcome.finished
        except SpecfleetError as exc:
            outcome.error_code, outcome.error = exc.code.name, exc.message[:300]
            outcome.retryable = is_retryable(exc.code, exc.message)
            outcome.in_time = outcome.retryable
        except TimeoutError:
            outcome.error_code, outcome.error = "NO_END", f"no end within the deadline + {GRACE_S:g} s"
        finally:
            live -= 1
        outcome.seconds = time.monotonic() - start
        outcomes[i] = outcome

    async def inject_fault(start: float) -> None:
        inject, recover = fault
        await trigger.wait()
        injected = time.monotonic()
        timing.update(injected=True, injected_after_s=round(injected - start, 1))
        await asyncio.to_thread(inject)  # blocking: kill -9 waits for the process, a restart for its readiness
        timing["inject_took_s"] = round(time.monotonic() - injected, 1)  # the router's and Redis's include a restart
        await asyncio.sleep(outage_s)
        await asyncio.to_thread(recover)
        timing["recovered_after_s"] = round(time.monotonic() - start, 1)

    async def main() -> float:
        # the SDK given every router replica the fleet has (a failed attempt resumes on the next)
        targets = getattr(fleet, "router_addresses", None) or fleet.router_address
        async with AsyncClient(targets, token=fleet.token, timeout=deadline_s, retries=SDK_RETRIES,
                               backoff=SDK_BACKOFF_S) as sdk:
            start = time.monotonic()
            faulting = asyncio.create_task(inject_fault(start)) if fault is not None else None
            await asyncio.gather(*(one(i, sdk, time.monotonic()) for i in range(len(requests))))
            wall = time.monotonic() - start
            if faulting is not None:
                if trigger.is_set():
                    await faulting  # the fleet is whole again before the next run
                else:
                    faulting.cancel()
            return wall

    timing["seconds"] = round(asyncio.run(main()), 1)
    return outcomes, timing


def summarize(outcomes: list[Outcome], baseline: list[Outcome] | None) -> dict:
    """Counts of one run: completed, lost (no full output), differing from the fault-free run (where both completed),
    errors by code, ended within the deadline + GRACE_S, latency."""
    completed = [o for o in outcomes if o.finished and not o.error_code]
    latencies = sorted(o.seconds for o in completed)
    errors = Counter(o.error_code for o in outcomes if o.error_code)
    summary = {"requests": len(outcomes), "completed": len(completed), "lost": len(outcomes) - len(completed),
               "errors_by_code": dict(errors), "non_retryable_errors": sum(
                   bool(o.error_code) and not o.retryable for o in outcomes),
               "within_deadline": sum(o.in_time for o in outcomes),
               "late": sum(not o.in_time for o in outcomes),
               "latest_end_s": round(max((o.seconds for o in outcomes), default=0.0), 1),
               "latency_ms": {"p50": percentile_ms(latencies, 0.5), "p99": percentile_ms(latencies, 0.99)},
               "error_examples": sorted({o.error for o in outcomes if o.error})[:3]}
    if baseline is not None:
        pairs = [(o, b) for o, b in zip(outcomes, baseline, strict=True) if o.finished and not o.error_code]
        summary["differing"] = sum(b.finished and not b.error_code and o.tokens != b.tokens for o, b in pairs)
        summary["uncompared"] = sum(not b.finished or bool(b.error_code) for _, b in pairs)
    return summary


def faults_under_load(fleet: Any, prompts: list[list[int]], streams: int, new_tokens: int,
                      deadline_s: float, outage_s: float = 5.0, seed: int = 0, faults: tuple[str, ...] | None = None,
                      say=lambda text: None) -> dict:
    """The `faults_under_load` section of the reliability report: a fault-free run of `streams` mixed requests, then
    one run per fault (all of `fault_actions(fleet)` by default), each injected once the streams hold half the
    tokens of the fault-free run."""
    requests = mixed_requests(prompts, streams, seed)
    actions = fault_actions(fleet)
    names = list(actions) if faults is None else list(faults)
    unknown = [n for n in names if n not in actions]
    if unknown:
        raise ValueError(f"unknown faults {unknown}; this fleet has {list(actions)}")
    say(f"faults under load: fault-free run of {streams} streams")
    baseline, timing = run_streams(fleet, requests, new_tokens, deadline_s)
    fault_free = {"seconds": timing["seconds"], **summarize(baseline, None)}
    inject_at = max(1, sum(len(o.tokens) for o in baseline) // 2)
    runs = []
    for i, name in enumerate(names):
        say(f"faults under load {i + 1}/{len(names)}: {name} with {streams} streams")
        outcomes, timing = run_streams(fleet, requests, new_tokens, deadline_s, actions[name], inject_at, outage_s)
        crashed = fleet.crashed()
        runs.append({"fault": name, **timing, **summarize(outcomes, baseline), "crashed": crashed})
    survived = sum(r["injected"] and r["lost"] == r["differing"] == r["late"] == 0 and not r["crashed"] for r in runs)
    return {"streams": streams, "greedy": sum(r.temperature == 0 for r in requests),
            "sampled": sum(r.temperature > 0 for r in requests), "sampling": SAMPLED, "max_new_tokens": new_tokens,
            "deadline_s": deadline_s, "bound_s": deadline_s + GRACE_S, "outage_s": outage_s,
            "inject_at_tokens": inject_at, "fault_free": fault_free, "injected": sum(r["injected"] for r in runs),
            "survived": survived, "requests_lost": sum(r["lost"] for r in runs),
            "outputs_differing_from_fault_free": sum(r["differing"] for r in runs),
            "requests_late": sum(r["late"] for r in runs), "runs": runs}


def format_table(section: dict) -> list[str]:
    """Lines of the printed table for the `faults_under_load` section."""
    s, free = section, section["fault_free"]
    lines = [f"faults under load: {s['streams']} streams ({s['greedy']} greedy, {s['sampled']} sampled), "
             f"{s['max_new_tokens']} tokens each, deadline {s['deadline_s']:g} s: injected {s['injected']}, survived "
             f"{s['survived']}, requests lost {s['requests_lost']}, outputs differing from the fault-free run "
             f"{s['outputs_differing_from_fault_free']}, past deadline + {GRACE_S:g} s {s['requests_late']}",
             f"  {'fault-free run':<26} {'':>26} {free['seconds']:>6.1f} s  completed {free['completed']:>4}"
             f"/{free['requests']}  p50 {free['latency_ms']['p50']} ms  p99 {free['latency_ms']['p99']} ms"]
    for r in s["runs"]:
        when = (f"at {r['injected_after_s']:>5.1f} s, {r['live_at_injection']:>4} live" if r["injected"]
                else "NOT INJECTED (ended first)")
        errors = ", ".join(f"{code} {n}" for code, n in r["errors_by_code"].items()) or "no errors"
        lines.append(f"  {r['fault']:<26} {when:>26} {r['seconds']:>6.1f} s  completed {r['completed']:>4}"
                     f"/{r['requests']}  lost {r['lost']}  differing {r['differing']}  late {r['late']}  latest "
                     f"{r['latest_end_s']} s  ({errors})")
    return lines
