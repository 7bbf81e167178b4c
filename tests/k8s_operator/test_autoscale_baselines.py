"""The autoscaling baselines of the simulator (HPA on GPU utilisation, KEDA on queue length, Knative's KPA, static at
the peak and at the mean), the traces they are scored on, and the scores (reversals, surge-to-scale-up time, the
grid). Pure and fast: hand-made observations, a hand-made fleet, and one tiny grid cell."""

import math

import numpy as np
import pytest

from specfleet_operator.simulator import autoscale, costs, traces
from specfleet_operator.simulator.autoscale import (
    HpaBehavior,
    HpaGpuUtilPolicy,
    KedaQueuePolicy,
    KnativeKpaPolicy,
    Observation,
)


def _obs(t, ready, requested=None, util=0.0, concurrency=0.0):
    return Observation(time_s=float(t), ready=ready, requested=ready if requested is None else requested,
                       utilization_percent=util, queue_wait_ms=0.0, tokens_per_s=0.0, live_requests=0,
                       inflight_requests=concurrency)


@pytest.fixture(scope="module")
def a100():
    return costs.a100_70b()


# a replica serving 100 tokens/s at a full batch of 16 (0.16 s per token), 0.01 s per token alone
FLEET = autoscale.FleetModel(capacity_tokens_per_s=100.0, idle_s_per_token=0.01, full_s_per_token=0.16, step_ms=80.0,
                             draft_step_ms=5.0, gpus_per_replica=5.0, target_gpus=4)


# --- HPA on GPU utilisation ---------------------------------------------------------------------------------------

def test_hpa_changes_nothing_within_its_tolerance_and_scales_by_the_ratio_outside():
    hpa = HpaGpuUtilPolicy(1, 100)
    assert hpa.decide(_obs(0, 10, util=76.0)) == 10  # 76 / 70 = 1.086: inside 1 +- 0.1
    assert hpa.decide(_obs(15, 10, util=64.0)) == 10  # 0.914: inside
    assert hpa.decide(_obs(30, 10, util=80.0)) == math.ceil(10 * 80 / 70)  # 1.14: 12


def test_hpa_sizes_by_the_ready_pods_and_keeps_pods_still_starting():
    hpa = HpaGpuUtilPolicy(1, 100)
    assert hpa.decide(_obs(0, 14, util=98.0)) == 20  # ceil(14 x 98 / 70) = ceil(19.6)
    # 10 of those ready, 10 starting, saturated: ceil(10 x 100 / 70) = 15 is recommended, but the down window still
    # holds the 20 of t = 0, so the pods starting stay
    assert hpa.decide(_obs(15, 10, requested=20, util=100.0)) == 20


def test_hpa_scale_down_waits_for_the_highest_recommendation_of_300_s():
    hpa = HpaGpuUtilPolicy(1, 100)
    assert hpa.decide(_obs(0, 10, util=80.0)) == 12
    held = [hpa.decide(_obs(t, 12, util=35.0)) for t in range(15, 300, 15)]  # ceil(12 x 0.5) = 6 recommended
    assert held == [12] * len(held)
    assert hpa.decide(_obs(300, 12, util=35.0)) == 6  # the 12 of t = 0 has left the window


def test_hpa_adds_at_most_max_of_doubling_and_four_pods_per_sync():
    behavior = HpaBehavior(1, 1000)
    assert behavior.apply(0.0, 3, 50) == 7  # 3 + 4 > 3 x 2
    assert HpaBehavior(1, 1000).apply(0.0, 10, 50) == 20  # 10 x 2 > 10 + 4
    assert HpaBehavior(1, 15).apply(0.0, 10, 50) == 15  # within the bounds
    assert HpaBehavior(5, 15).apply(0.0, 10, 0) == 5  # nothing recommended higher in the window: straight down


# --- KEDA on queue length -----------------------------------------------------------------------------------------

def test_keda_polls_every_30_s_and_sizes_a_full_batch_per_replica():
    keda = KedaQueuePolicy(1, 100, target_per_replica=64)
    assert keda.decide(_obs(0, 1, concurrency=100.0)) == 2  # ceil(100 / 64)
    # 15 s later the queue is 1,000 requests, but the last poll (t = 0) said 100: 100 / (64 x 2) is 0.78 -> 2
    assert keda.decide(_obs(15, 1, requested=2, concurrency=1000.0)) == 2
    # polled at 30 s: ceil(1000 / 64) = 16, at most max(2 x 2, 2 + 4) = 6 this sync
    assert keda.decide(_obs(30, 2, requested=2, concurrency=1000.0)) == 6
    assert keda.decide(_obs(45, 2, requested=6, concurrency=0.0)) == 12  # still the 1,000 polled at 30 s
    # within tolerance of the current count: 64 x 12 x 1.05 requests change nothing
    assert keda.decide(_obs(60, 12, requested=12, concurrency=64 * 12 * 1.05)) == 12


# --- Knative KPA --------------------------------------------------------------------------------------------------

def test_kpa_panics_when_the_panic_window_wants_twice_the_ready_pods_and_never_scales_down_in_panic():
    kpa = KnativeKpaPolicy(1, 1000, target_per_replica=10)
    out = {}
    for t in range(0, 60):  # 20 requests on 2 pods: stable at 2
        out[t] = kpa.decide(_obs(t, 2, concurrency=20.0))
    assert out[58] == 2 and not kpa.panicking
    # a surge to 100 requests: the 6-s mean reaches 2 x 2 pods x 10 per pod at t = 62
    # (t = 60: (5 x 20 + 100) / 6 = 33.3 -> 4 pods, 4 / 2 >= 2 -> panic at once)
    assert kpa.decide(_obs(60, 2, concurrency=100.0)) == 4
    assert kpa.panicking
    requested = 4
    seen = []
    for t in range(61, 70):
        requested = kpa.decide(_obs(t, 2, requested=requested, concurrency=100.0))
        seen.append(requested)
    assert seen == sorted(seen) and seen[-1] == 10  # the panic window's mean: 100 / 10
    # the surge ends and the new pods serve: the condition last held at t = 68 (10 wanted, 2 ready); panic holds
    # the count (nothing removed) until a tick more than 60 s later, then the stable mean (0) takes over, at most
    # halving the ready pods per decision
    history = {}
    for t in range(70, 200):
        requested = kpa.decide(_obs(t, requested, concurrency=0.0))
        if t % 2 == 0:
            history[t] = (requested, kpa.panicking)
    assert all(history[t] == (10, True) for t in range(70, 129, 2))
    assert history[130] == (5, False)
    assert history[132][0] == 2 and history[134][0] == 1 and history[198][0] == 1


def test_kpa_decides_every_two_seconds_and_keeps_the_count_between():
    kpa = KnativeKpaPolicy(1, 1000, target_per_replica=10)
    assert kpa.decide(_obs(0, 3, concurrency=30.0)) == 3
    assert kpa.decide(_obs(1, 3, concurrency=300.0)) == 3  # sampled, not decided
    assert kpa.decide(_obs(2, 3, concurrency=300.0)) > 3


def test_kpa_stable_mode_follows_the_60_s_mean():
    kpa = KnativeKpaPolicy(1, 1000, target_per_replica=10)
    requested = 4
    for t in range(0, 120):
        requested = kpa.decide(_obs(t, requested, concurrency=45.0))
    assert requested == 5 and not kpa.panicking


# --- static baselines and the observations ------------------------------------------------------------------------

def test_static_peak_and_mean_read_the_trace():
    n = 240
    trace = traces.Trace("hand", 180.0, np.array([1.0] * 60 + [70.0] * 120 + [150.0] * 60),
                         np.zeros(n, dtype=np.int64), np.full(n, 100, dtype=np.int64), np.zeros(n, dtype=np.int64))
    # tokens per s: 6,000 in second 1, 12,000 in second 70, 6,000 in second 150: the 60-s mean peaks at 200 tok/s
    assert autoscale.static_replicas(trace, 30.0, 1, 100, "peak") == math.ceil(12_000 / 60 / 30)
    assert autoscale.static_replicas(trace, 30.0, 1, 100, "mean") == math.ceil(24_000 / 180 / 30)
    assert autoscale.static_replicas(trace, 30.0, 1, 100, "initial") == math.ceil(6_000 / 60 / 30)
    assert autoscale.static_replicas(trace, 30.0, 1, 5, "peak") == 5


def test_run_policy_fills_queue_and_concurrency(a100):
    class Recorder:
        period_s = 1.0

        def __init__(self):
            self.seen = []

        def decide(self, obs):
            self.seen.append(obs)
            return obs.requested

    trace = traces.make("steady", a100, 2.0, 60.0, seed=0)  # ~2 x 256 tokens/s on a 100 tokens/s replica
    recorder = Recorder()
    autoscale.run_policy("rec", recorder, trace, FLEET, 1, 1e3)
    assert len(recorder.seen) == 60
    late = recorder.seen[-1]
    assert late.inflight_requests == pytest.approx(16.0)  # saturated: a full batch (Little's law)
    assert late.queued_requests == pytest.approx(late.queue_wait_ms / 1e3 * 100.0 / np.mean(trace.output_tokens))
    assert late.concurrency == late.inflight_requests + late.queued_requests
    assert sum(o.offered_tokens_per_s for o in recorder.seen) == pytest.approx(trace.output_tokens.sum())


# --- traces -------------------------------------------------------------------------------------------------------

def test_on_off_bursts_are_5_to_20_times_the_base_and_60_to_120_s_long(a100):
    trace = traces.make("on-off", a100, 400.0, 3600.0, seed=2)
    assert len(trace.surges) >= 3
    inside = np.zeros(len(trace), dtype=bool)
    for start, end in trace.surges:
        assert 60.0 <= end - start <= 120.0
        inside |= (trace.arrival_s >= start) & (trace.arrival_s < end)
    calm_s = 3600.0 - sum(end - start for start, end in trace.surges)
    base = (~inside).sum() / calm_s
    rates = [((trace.arrival_s >= s) & (trace.arrival_s < e)).sum() / (e - s) for s, e in trace.surges]
    assert all(4.5 <= r / base <= 21.0 for r in rates), [round(r / base, 1) for r in rates]
    assert max(rates) == pytest.approx(400.0, rel=0.05)  # the largest burst is the peak


def test_on_off_too_short_for_a_calm_period_still_bursts(a100):
    trace = traces.make("on-off", a100, 100.0, 200.0, seed=0)
    assert len(trace.surges) == 1 and trace.surges[0][0] == pytest.approx(200.0 / 3)


def test_diurnal_runs_from_a_tenth_of_the_peak_to_the_peak(a100):
    trace = traces.make("diurnal", a100, 200.0, 3600.0, seed=1)
    per_min = np.bincount((trace.arrival_s // 60).astype(int), minlength=60) / 60.0
    assert per_min[0] / 200.0 == pytest.approx(0.1, abs=0.03)
    assert per_min[-1] / 200.0 == pytest.approx(0.1, abs=0.03)
    assert per_min.max() / 200.0 == pytest.approx(1.0, abs=0.05)
    assert 25 <= int(np.argmax(per_min)) <= 34  # mid-time
    assert trace.surges == ()


def test_ramps_and_steady(a100):
    long = traces.make("ramp", a100, 50.0, 3600.0, seed=0)
    short = traces.make("ramp-5m", a100, 50.0, 3600.0, seed=0)
    steady = traces.make("steady", a100, 50.0, 3600.0, seed=0)
    assert long.surges == ((0.0, 1800.0),)
    assert short.duration_s == 300.0 and short.surges == ((0.0, 150.0),) and short.kind == "ramp-5m"
    assert steady.surges == ()
    assert len(steady) / 3600.0 == pytest.approx(50.0, rel=0.02)


@pytest.mark.parametrize("kind", traces.AUTOSCALE_TRACES)
def test_every_trace_peaks_at_80_percent_of_the_most_replicas(a100, kind):
    rate = autoscale.peak_rate(a100, FLEET, 100)
    trace = traces.make(kind, a100, rate, 3600.0, seed=0)
    need = autoscale.static_replicas(trace, FLEET.capacity_tokens_per_s, 1, 1000, "peak")
    if kind == "ramp-5m":  # the 60-s mean over the top of a 5-minute triangle: 1 - 0.95 x 15 / 150 = 90.5% of its peak
        assert 68 <= need <= 78, need
    else:
        assert 75 <= need <= 90, need


# --- scores -------------------------------------------------------------------------------------------------------

def test_reversals_count_turns_of_direction():
    assert autoscale.count_reversals([]) == 0
    assert autoscale.count_reversals([5]) == 0
    assert autoscale.count_reversals([1, 2, 4, 8]) == 0
    assert autoscale.count_reversals([10, 12, 15, 15, 13, 14, 14, 20]) == 2  # up, down, up
    assert autoscale.count_reversals([4, 3, 4, 3, 4]) == 3  # down, up, down, up


def test_surge_to_scale_up_time_on_a_synthetic_timeline():
    surges = [(100.0, 160.0), (400.0, 480.0), (700.0, 760.0)]
    ups = [50.0, 115.0, 130.0, 520.0, 690.0]
    # 115 - 100; 520 - 400 (after the burst ended, before the next one); none at or after 700
    assert autoscale.surge_delays(ups, surges, 900.0) == [15.0, 120.0, None]
    assert autoscale.surge_delays([], surges, 900.0) == [None, None, None]
    assert autoscale.surge_delays([1.0], [], 900.0) == []


def test_a_tiny_grid_runs_every_policy_on_every_trace():
    rows = autoscale.score_grid(costs.a100_70b(), scales=(4,), seeds=(0, 1), duration_s=240.0)
    assert {(r["trace"], r["policy"]) for r in rows} == {
        (t, p) for t in traces.AUTOSCALE_TRACES for p in autoscale.POLICIES}
    for r in rows:
        assert r["seeds"] == 2 and (r["min_replicas"], r["max_replicas"]) == (1, 4)
        assert 0.0 <= r["slo_attainment"] <= 1.0 and r["gpu_hours"] > 0
        assert r["reversals"] <= r["scaling_actions"]
        if r["policy"].startswith("static"):
            assert r["scaling_actions"] == 0 and r["surge_to_scale_up_s"] is None
        if r["trace"] in ("steady", "diurnal"):
            assert r["surge_to_scale_up_s"] is None and r["surges_without_scale_up"] == 0


def test_the_ideal_reactive_reference_asks_for_the_load_at_once_and_keeps_the_largest_seen():
    ideal = autoscale.IdealReactivePolicy(1, 50, capacity_tokens_per_s=100.0, window_s=1, drain_s=10.0)

    def obs(t, offered, ready, wait_ms=0.0):
        return Observation(time_s=float(t), ready=ready, requested=ready, utilization_percent=0.0,
                           queue_wait_ms=wait_ms, tokens_per_s=0.0, live_requests=1, offered_tokens_per_s=offered)

    assert ideal.decide(obs(0, 250.0, 2)) == 3  # 2.5 replicas of tokens arriving, at once
    # a backlog of 2 replicas x 5 s = 10 pod-s is worked off within 10 s: one more
    assert ideal.decide(obs(1, 250.0, 3, wait_ms=5000.0 * 2 / 3)) == 4
    assert ideal.decide(obs(2, 50.0, 4)) == 3  # the load fell: down to the largest load seen, never below
    assert ideal.decide(obs(3, 900.0, 3)) == 9
    assert ideal.decide(obs(4, 0.0, 9)) == 9
