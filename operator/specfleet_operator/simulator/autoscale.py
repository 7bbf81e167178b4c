"""Scores autoscaling policies on a load ramp: SLO attainment (share of requests whose latency per output token
meets the SLO), GPU-hours, and the number of scaling actions.

The fleet is a CoSine deployment whose per-verifier capacity and per-token latency come from the event core
(`engine.simulate` on one replica, saturated and nearly idle); the hours-long ramp then runs as a fluid queue in
1-second ticks (a backlog of tokens served at capacity x ready replicas), which is what makes 1,000 replicas over
an hour cheap. New replicas become ready after a provisioning delay (a GPU pod pulls its image and loads weights);
removed ones stop taking work at once (drained) and are paid for until their in-flight requests are done.

Policies: static at the maximum, static at the minimum, a plain threshold rule, and the operator's own
`specfleet_operator.policy.decide`, driven through `OperatorPolicy` with the metrics its heartbeats would carry."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from specfleet_operator.simulator.costs import CostModel
from specfleet_operator.simulator.engine import saturated_tokens_per_s, simulate
from specfleet_operator.simulator.systems import build
from specfleet_operator.simulator.traces import Trace, make

POLICIES = ("static-max", "static-min", "threshold", "operator")


@dataclass(frozen=True)
class FleetModel:
    """What one verifier replica (with its drafter share) delivers, measured with the event core."""

    capacity_tokens_per_s: float  # saturated: every slot busy
    idle_s_per_token: float  # one request alone
    full_s_per_token: float  # a full batch
    step_ms: float  # verifier round at a full batch
    draft_step_ms: float
    gpus_per_replica: float
    target_gpus: float


def measure_fleet(costs: CostModel, seed: int = 0, system: str = "cosine") -> FleetModel:
    sys_ = build(system, costs)
    per_request = costs.request.output_tokens_mean
    capacity = saturated_tokens_per_s(sys_, seed)
    quiet_rate = 0.1 * 1e3 / (per_request * float(costs.target.ms(1, 1)))  # one request in flight 10% of the time
    lonely = make("steady", costs, quiet_rate, 20 / quiet_rate, seed)  # ~20 requests
    quiet = simulate(sys_, lonely, 1, seed=seed).summary()
    return FleetModel(capacity_tokens_per_s=capacity, idle_s_per_token=quiet["p50_tpot_ms"] / 1e3,
                      full_s_per_token=costs.max_batch / capacity,
                      step_ms=float(costs.target.ms(costs.max_batch * (1 + costs.k), costs.max_batch)),
                      draft_step_ms=float(costs.drafter.ms(1, 1)), gpus_per_replica=sys_.gpus_per_replica(),
                      target_gpus=costs.target_gpus)


@dataclass(frozen=True)
class Observation:
    """What a policy sees at a control tick (the figures the pods' heartbeats and the queue stream report)."""

    time_s: float
    ready: int  # serving replicas
    requested: int  # replicas asked for (ready + provisioning)
    utilization_percent: float
    queue_wait_ms: float
    tokens_per_s: float
    live_requests: int


class StaticPolicy:
    def __init__(self, replicas: int):
        self.replicas = replicas

    def decide(self, obs: Observation) -> int:
        return self.replicas


class ThresholdPolicy:
    """Add `step` replicas while queue wait is over target, remove `step` while utilisation is under 50% and the
    queue is short; one cooldown after any change. No windows, no hysteresis beyond that gap."""

    def __init__(self, low: int, high: int, queue_wait_ms: float, step: int, cooldown_s: float = 60.0):
        self.low, self.high, self.target, self.step, self.cooldown_s = low, high, queue_wait_ms, step, cooldown_s
        self.last_change = -math.inf

    def decide(self, obs: Observation) -> int:
        want = obs.requested
        if obs.time_s - self.last_change < self.cooldown_s:
            return want
        if obs.queue_wait_ms > self.target:
            want = obs.requested + self.step
        elif obs.utilization_percent < 50 and obs.queue_wait_ms < self.target / 2:
            want = obs.requested - self.step
        want = max(self.low, min(self.high, want))
        if want != obs.requested:
            self.last_change = obs.time_s
        return want


class OperatorPolicy:
    """Adapter: feeds `specfleet_operator.policy.decide` the MetricsSample the fleet's heartbeats would produce
    (one verifier role, one drafter pool sized with it) and returns its verifier count."""

    def __init__(self, low: int, high: int, fleet: FleetModel, costs: CostModel, max_step: int,
                 queue_wait_ms: float):
        from specfleet_operator.spec import FleetSpec

        self.fleet, self.costs = fleet, costs
        self.spec = FleetSpec.from_dict("sim", {
            "verifier": {"replicas": low, "minReplicas": low, "maxReplicas": high},
            "drafters": [{"name": "general", "model": "drafter-general", "replicas": low, "minReplicas": 1,
                          "maxReplicas": high}],
            "autoscaling": {"maxStep": max_step, "targets": {"queueWaitMs": queue_wait_ms}}})
        self.memory = None
        self.history: list = []
        self.drafters = low

    def decide(self, obs: Observation) -> int:
        from specfleet_operator.metrics import MetricsSample, PodLoad, RoleLoad
        from specfleet_operator.policy import decide

        busy = obs.utilization_percent / 100
        verifier = RoleLoad(tuple(PodLoad(
            pod=f"v{i}", inflight=1 if obs.live_requests else 0, busy_frac=busy,
            tokens_per_s=obs.tokens_per_s / max(obs.ready, 1), step_ms=self.fleet.step_ms,
            gpu_util=obs.utilization_percent, queue_wait_ms=obs.queue_wait_ms) for i in range(max(obs.ready, 1))))
        drafter_capacity = self.drafters * self.fleet.capacity_tokens_per_s / self.costs.cosine_drafter_ratio
        drafter_busy = min(1.0, obs.tokens_per_s / max(drafter_capacity, 1e-9))
        drafters = RoleLoad(tuple(PodLoad(
            pod=f"d{i}", busy_frac=drafter_busy, tokens_per_s=obs.tokens_per_s / max(self.drafters, 1),
            step_ms=self.fleet.draft_step_ms, gpu_util=100 * drafter_busy) for i in range(self.drafters)))
        sample = MetricsSample(time_s=obs.time_s, roles={"verifier": verifier, "drafter-general": drafters},
                               live_requests=obs.live_requests)
        self.history = [*self.history[-8:], sample]
        current = {"router": 1, "fusion": 1, "drafter-general": self.drafters, "verifier": obs.requested}
        result = decide(self.history, self.spec, current, self.memory, now=obs.time_s)
        self.memory = result.memory
        self.drafters = result.desired["drafter-general"]
        return result.desired["verifier"]


@dataclass
class ScoreResult:
    policy: str
    slo_attainment: float
    gpu_hours: float
    scaling_actions: int
    p99_latency_per_token_ms: float
    timeline: dict = field(default_factory=dict)  # time_s, requested, ready, load_tokens_per_s, queue_wait_ms

    def summary(self) -> dict:
        return {"policy": self.policy, "slo_attainment": round(self.slo_attainment, 4),
                "gpu_hours": round(self.gpu_hours, 2), "scaling_actions": self.scaling_actions,
                "p99_latency_per_token_ms": round(self.p99_latency_per_token_ms, 2)}


def run_policy(name: str, policy, trace: Trace, fleet: FleetModel, start: int, slo_ms_per_token: float,
               provision_s: float = 60.0, control_s: float = 15.0) -> ScoreResult:
    ticks = int(math.ceil(trace.duration_s))
    tick_of = np.minimum(trace.arrival_s.astype(np.int64), ticks - 1)
    arriving_tokens = np.bincount(tick_of, weights=trace.output_tokens, minlength=ticks)
    arriving_requests = np.bincount(tick_of, minlength=ticks)
    cap = fleet.capacity_tokens_per_s
    mean_output = max(float(np.mean(trace.output_tokens)), 1.0) if len(trace) else 1.0
    ready, requested, backlog, actions, gpu_s = start, start, 0.0, 0, 0.0
    pending: list[tuple[float, int]] = []  # (ready at, replicas)
    draining: list[tuple[float, int]] = []  # (released at, replicas)
    per_token_s = np.zeros(ticks)
    series = {"time_s": [], "requested": [], "ready": [], "load_tokens_per_s": [], "queue_wait_ms": []}
    util, served = 0.0, 0.0
    for t in range(ticks):
        ready += sum(n for at, n in pending if at <= t)
        pending = [(at, n) for at, n in pending if at > t]
        draining = [(at, n) for at, n in draining if at > t]
        capacity = cap * ready
        backlog += arriving_tokens[t]
        served = min(backlog, capacity)
        backlog -= served
        util = served / capacity if capacity > 0 else 1.0
        wait_s = backlog / capacity if capacity > 0 else float(trace.duration_s)
        # a request arriving now waits for the backlog, then decodes at the per-token time of this batch size
        decode_s = fleet.idle_s_per_token + (fleet.full_s_per_token - fleet.idle_s_per_token) * util
        per_token_s[t] = decode_s + wait_s / mean_output
        gpu_s += (requested + sum(n for _, n in draining)) * fleet.gpus_per_replica
        if t % int(control_s) == 0:
            obs = Observation(float(t), ready, requested, 100 * util, wait_s * 1e3, served,
                              int(arriving_requests[max(0, t - 60):t + 1].sum() + (backlog > 0)))
            want = int(policy.decide(obs))
            if want != requested:
                actions += 1
                if want > requested:
                    pending.append((t + provision_s, want - requested))
                else:
                    drop = requested - want
                    # cancel replicas still provisioning first, then drain ready ones
                    while drop and pending:
                        at, n = pending.pop()
                        cut = min(n, drop)
                        drop -= cut
                        if n > cut:
                            pending.append((at, n - cut))
                    ready -= drop
                    draining.append((t + fleet.full_s_per_token * mean_output, drop))
                requested = want
        series["time_s"].append(t)
        series["requested"].append(requested)
        series["ready"].append(ready)
        series["load_tokens_per_s"].append(float(arriving_tokens[t]))
        series["queue_wait_ms"].append(wait_s * 1e3)
    per_request = per_token_s[tick_of]
    attained = float(np.mean(per_request <= slo_ms_per_token / 1e3)) if len(trace) else 1.0
    p99 = float(np.percentile(per_request, 99) * 1e3) if len(trace) else 0.0
    every = max(1, ticks // 400)  # keep the timeline small in the JSON
    timeline = {key: values[::every] for key, values in series.items()}
    return ScoreResult(name, attained, gpu_s / 3600, actions, p99, timeline)


def score_policies(costs: CostModel, low: int, high: int, duration_s: float, seed: int,
                   provision_s: float = 60.0, queue_wait_ms: float = 50.0, max_step: int | None = None,
                   policies: tuple[str, ...] = POLICIES) -> tuple[FleetModel, float, list[ScoreResult]]:
    """Every policy on the same ramp, whose peak needs ~80% of `high` replicas. Returns the fleet model, the SLO in
    ms per output token (1.5 x the per-token time of a full batch) and one result per policy."""
    fleet = measure_fleet(costs, seed)
    peak_rate = 0.8 * high * fleet.capacity_tokens_per_s / costs.request.output_tokens_mean
    trace = make("ramp", costs, peak_rate, duration_s, seed)
    slo_ms = 1.5 * fleet.full_s_per_token * 1e3
    step = max_step or max(2, high // 20)
    results = []
    for name in policies:
        if name == "static-max":
            policy, start = StaticPolicy(high), high
        elif name == "static-min":
            policy, start = StaticPolicy(low), low
        elif name == "threshold":
            policy, start = ThresholdPolicy(low, high, queue_wait_ms, step), low
        elif name == "operator":
            policy, start = OperatorPolicy(low, high, fleet, costs, step, queue_wait_ms), low
        else:
            raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
        results.append(run_policy(name, policy, trace, fleet, start, slo_ms, provision_s))
    return fleet, slo_ms, results
