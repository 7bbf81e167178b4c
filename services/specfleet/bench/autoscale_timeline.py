"""What `specfleet bench autoscale` measures, computed from a recorded run (pure: no fleet, no clock): the scaling
decisions parsed from the autoscaler's log lines, the time from a burst's start to the first scale-up decision,
direction reversals per pool, and the verifier queue wait against its target. The counting rules are the
simulator's (`specfleet_operator.simulator.autoscale`), so a local run and a simulated one score alike."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from specfleet_operator.simulator.autoscale import count_reversals, surge_delays

_ACTION = re.compile(r"autoscale \| (.*)")
_DECISION = re.compile(r"^(?P<role>[\w.-]+): (?P<before>\d+) -> (?P<after>\d+) replicas \((?P<reason>.*)\)$")


@dataclass(frozen=True)
class ScalingDecision:
    t: float  # seconds since the run's t0
    role: str  # verifier, fusion, router, drafter-<pool>
    before: int
    after: int
    reason: str


def parse_actions(log_lines: Iterable[str], t0: float) -> list[dict]:
    """The autoscaler's lines (`<epoch stamp> ... autoscale | <action>`, as `specfleet up` prints them and the bench
    stamps them on reading) as [{"t": seconds since t0, "action": text}]; lines before t0 included (negative t)."""
    actions = []
    for line in log_lines:
        stamp, _, text = line.partition(" ")
        found = _ACTION.search(text)
        if found:
            actions.append({"t": round(float(stamp) - t0, 2), "action": found.group(1)})
    return actions


def decisions(actions: Iterable[Mapping]) -> list[ScalingDecision]:
    """The replica-count changes among the actions (`verifier: 1 -> 2 replicas (why)`); drains, stops and starts
    are the loop carrying them out, not decisions."""
    out = []
    for action in actions:
        found = _DECISION.match(action["action"])
        if found:
            out.append(ScalingDecision(float(action["t"]), found["role"], int(found["before"]), int(found["after"]),
                                       found["reason"]))
    return out


def reversals_per_role(made: Sequence[ScalingDecision], start: float = float("-inf"),
                       end: float = float("inf")) -> dict[str, int]:
    """Per role with a decision in [start, end): how often its count turned from going up to going down or back."""
    counts: dict[str, list[int]] = {}
    for d in sorted(made, key=lambda d: d.t):
        if start <= d.t < end:
            counts.setdefault(d.role, [d.before]).append(d.after)
    return {role: count_reversals(seq) for role, seq in sorted(counts.items())}


def reversals_at_constant_load(made: Sequence[ScalingDecision], load: Sequence[Mapping], end: float) -> dict[str, int]:
    """Reversals per role summed over the phases of constant load (`load`: [{"t", "clients"}], oldest first, each
    phase lasting until the next one or `end`): a turn within one phase is flapping; up in a burst then down after
    it is not."""
    total: dict[str, int] = {}
    for i, phase in enumerate(load):
        until = load[i + 1]["t"] if i + 1 < len(load) else end
        for role, n in reversals_per_role(made, phase["t"], until).items():
            total[role] = total.get(role, 0) + n
    return dict(sorted(total.items()))


def burst_to_scale_up_s(made: Sequence[ScalingDecision], burst_start: float, until: float,
                        role: str | None = None) -> float | None:
    """Seconds from a burst's start to the first scale-up decision (of `role`, or of any role) at or after it and
    before `until`; None where there was none."""
    ups = [d.t for d in made if d.after > d.before and (role is None or d.role == role)]
    return surge_delays(ups, [(burst_start, until)], until)[0]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (the sorted value at index int(q * n), capped at the last); None without values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def wait_against_target(waits: Sequence[float], target_ms: float) -> dict:
    """Queue-wait samples (ms) against their target: how many, the share over target, p50, p99, max."""
    return {"samples": len(waits), "share_of_samples_over_target": round(
        sum(w > target_ms for w in waits) / max(1, len(waits)), 3),
        "p50": percentile(waits, 0.5), "p99": percentile(waits, 0.99), "max": max(waits, default=0.0)}


def window(rows: Iterable[Mapping], start: float, end: float) -> list[Mapping]:
    """The rows (samples, requests, load phases: anything with "t") with start <= t < end."""
    return [r for r in rows if start <= r["t"] < end]


def stage_summary(name: str, start: float, end: float, samples: Sequence[Mapping], requests: Sequence[Mapping],
                  load: Sequence[Mapping], made: Sequence[ScalingDecision], target_ms: float) -> dict:
    """One stage of the run (the ramp, or the burst with its base load before and after) from the recording:
    requests and their latency, decisions and reversals per role, verifier queue wait against target (both the
    per-interval mean the policy scales on and the p99 of recent waits the verifiers report)."""
    mine = window(requests, start, end)
    latencies = sorted(r["latency_s"] for r in mine if r["ok"])
    phases = window(load, start, end)
    stage_samples = window(samples, start, end)
    return {
        "stage": name, "start_s": round(start, 2), "end_s": round(end, 2),
        "clients": [p["clients"] for p in phases],
        "requests": len(mine), "requests_ok": sum(r["ok"] for r in mine),
        "latency_s": {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99)},
        "scaling_decisions": [{"t": d.t, "role": d.role, "from": d.before, "to": d.after}
                              for d in made if start <= d.t < end],
        "reversals": reversals_per_role(made, start, end),
        "reversals_at_constant_load": reversals_at_constant_load(made, phases, end),
        "verifier_queue_wait_ms": wait_against_target(
            [s["verifier_queue_wait_ms"] for s in stage_samples if "verifier_queue_wait_ms" in s], target_ms),
        "verifier_queue_wait_p99_ms": wait_against_target(
            [s["verifier_queue_wait_p99_ms"] for s in stage_samples], target_ms),
    }


def burst_summary(start: float, end: float, burst_start: float, burst_end: float, samples: Sequence[Mapping],
                  requests: Sequence[Mapping], load: Sequence[Mapping], made: Sequence[ScalingDecision],
                  target_ms: float) -> dict:
    """The burst stage: stage_summary plus the time from the burst's start to the first scale-up decision (any
    role, and per role that scaled up) before the load fell back, the replicas when it started, and the queue
    wait while it lasted."""
    out = stage_summary("burst", start, end, samples, requests, load, made, target_ms)
    before = [s for s in samples if s["t"] <= burst_start]
    roles = sorted({d.role for d in made if d.after > d.before and burst_start <= d.t < burst_end})
    out.update(
        burst_start_s=round(burst_start, 2), burst_end_s=round(burst_end, 2),
        replicas_at_burst_start=dict(before[-1]["replicas"]) if before else {},
        burst_to_scale_up_s=_rounded(burst_to_scale_up_s(made, burst_start, burst_end)),
        burst_to_scale_up_s_per_role={r: _rounded(burst_to_scale_up_s(made, burst_start, burst_end, r))
                                      for r in roles},
        verifier_queue_wait_ms_during_burst=wait_against_target(
            [s["verifier_queue_wait_ms"] for s in window(samples, burst_start, burst_end)
             if "verifier_queue_wait_ms" in s], target_ms))
    return out


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
