"""What `specfleet bench autoscale` reports, computed from a recorded timeline (no fleet): decisions parsed from the
autoscaler's log lines, the time from a burst to the first scale-up decision, reversals per role (overall and
within phases of constant load) and the queue wait against its target."""

from specfleet.bench.autoscale_timeline import (
    burst_summary,
    burst_to_scale_up_s,
    decisions,
    parse_actions,
    percentile,
    reversals_at_constant_load,
    reversals_per_role,
    wait_against_target,
)

T0 = 1_000.0


def _lines(*timed: tuple[float, str]) -> list[str]:
    # as the bench stamps `specfleet up`'s output on reading it
    return [f"{T0 + t:.3f}        autoscale | {text}" for t, text in timed]


RECORDING = _lines(
    (5.0, "verifier: 1 -> 2 replicas (panic: queue wait: recommends 3, stabilised 3)"),  # the ramp
    (6.0, "start verifier"),
    (30.0, "verifier: 2 -> 1 replicas (idle: recommends 1, stabilised 1)"),
    (31.0, "drain verifier-2"),
    (63.2, "verifier: 1 -> 3 replicas (panic: arrival rate in 60 s: recommends 3, stabilised 3)"),  # the burst
    (64.0, "drafter-suffix: 1 -> 2 replicas (CoSine balance: recommends 2, stabilised 2)"),
    (70.0, "verifier: 3 -> 2 replicas (utilisation: recommends 2, stabilised 2)"),  # a turn at constant load
    (75.0, "verifier: 2 -> 3 replicas (utilisation: recommends 3, stabilised 3)"),  # and back: flapping
    (95.0, "verifier: 3 -> 1 replicas (idle: recommends 1, stabilised 1)"),
)
LOAD = [{"t": 0.0, "clients": 12, "stage": "ramp"}, {"t": 20.0, "clients": 0, "stage": "ramp"},
        {"t": 40.0, "clients": 1, "stage": "burst"}, {"t": 60.0, "clients": 12, "stage": "burst"},
        {"t": 90.0, "clients": 1, "stage": "burst"}]


def test_decisions_are_parsed_from_the_autoscaler_lines_and_other_output_is_ignored():
    lines = [*RECORDING, f"{T0 + 1:.3f}         verifier | INFO batch of 3", f"{T0 + 2:.3f} no stamp here"]
    actions = parse_actions(lines, T0)
    assert len(actions) == len(RECORDING) and actions[0] == {"t": 5.0, "action": RECORDING[0].split("| ", 1)[1]}
    made = decisions(actions)
    assert [(d.t, d.role, d.before, d.after) for d in made] == [
        (5.0, "verifier", 1, 2), (30.0, "verifier", 2, 1), (63.2, "verifier", 1, 3), (64.0, "drafter-suffix", 1, 2),
        (70.0, "verifier", 3, 2), (75.0, "verifier", 2, 3), (95.0, "verifier", 3, 1)]
    assert made[2].reason.startswith("panic: arrival rate")


def test_burst_to_scale_up_is_the_first_scale_up_after_the_burst_starts_and_before_it_ends():
    made = decisions(parse_actions(RECORDING, T0))
    assert round(burst_to_scale_up_s(made, 60.0, 90.0), 6) == 3.2
    assert burst_to_scale_up_s(made, 60.0, 90.0, "drafter-suffix") == 4.0
    assert burst_to_scale_up_s(made, 60.0, 63.0) is None  # the load fell back before any decision
    assert burst_to_scale_up_s(made, 60.0, 90.0, "router") is None
    # a scale-down in the burst is no scale-up; a scale-up before the burst does not count
    assert burst_to_scale_up_s(made, 29.0, 40.0) is None
    assert burst_to_scale_up_s(made, 4.0, 20.0) == 1.0


def test_reversals_per_role_overall_in_a_window_and_at_constant_load():
    made = decisions(parse_actions(RECORDING, T0))
    # verifier counts 1 2 1 3 2 3 1: every change turns; the drafter pool only went up
    assert reversals_per_role(made) == {"drafter-suffix": 0, "verifier": 5}
    assert reversals_per_role(made, 40.0, 200.0) == {"drafter-suffix": 0, "verifier": 3}  # 1 3 2 3 1
    assert reversals_per_role(made, 100.0, 200.0) == {}
    # up in the burst and down after it is no flapping; 3 -> 2 -> 3 within the 12-client phase is two turns
    assert reversals_at_constant_load(made, LOAD, end=120.0) == {"drafter-suffix": 0, "verifier": 2}
    steady = decisions(parse_actions(RECORDING[:4], T0))
    assert reversals_at_constant_load(steady, LOAD, end=120.0) == {"verifier": 0}


def test_queue_wait_against_target():
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([3.0, 1.0, 2.0], 0.99) == 3.0
    waits = [2000.0, 10.0, 10.0, 60.0, 10.0, 80.0, 10.0, 50.0, 400.0, 120.0]  # at the target is not over it
    assert wait_against_target(waits, 50.0) == {"samples": 10, "share_of_samples_over_target": 0.5, "p50": 60.0,
                                                "p99": 2000.0, "max": 2000.0}
    assert wait_against_target([], 50.0) == {"samples": 0, "share_of_samples_over_target": 0.0, "p50": None,
                                             "p99": None, "max": 0.0}


def test_burst_summary_from_a_recorded_timeline():
    made = decisions(parse_actions(RECORDING, T0))
    samples = [{"t": float(t), "replicas": {"verifier": 1 if t < 64 else 3}, "draining": {},
                "verifier_queue_wait_ms": 300.0 if 60 <= t < 70 else 10.0,
                "verifier_queue_wait_p99_ms": 900.0 if 60 <= t < 75 else 20.0} for t in range(40, 120)]
    requests = [{"t": 50.0, "ok": True, "latency_s": 1.0}, {"t": 61.0, "ok": True, "latency_s": 4.0},
                {"t": 62.0, "ok": False, "latency_s": 120.0}, {"t": 30.0, "ok": True, "latency_s": 9.0}]
    out = burst_summary(40.0, 120.0, 60.0, 90.0, samples, requests, LOAD, made, 50.0)
    assert out["clients"] == [1, 12, 1] and out["requests"] == 3 and out["requests_ok"] == 2
    assert out["burst_to_scale_up_s"] == 3.2
    assert out["burst_to_scale_up_s_per_role"] == {"drafter-suffix": 4.0, "verifier": 3.2}
    assert out["replicas_at_burst_start"] == {"verifier": 1}
    assert out["reversals"] == {"drafter-suffix": 0, "verifier": 3}
    assert out["reversals_at_constant_load"] == {"drafter-suffix": 0, "verifier": 2}
    assert out["verifier_queue_wait_ms"]["share_of_samples_over_target"] == round(10 / 80, 3)
    assert out["verifier_queue_wait_p99_ms"]["share_of_samples_over_target"] == round(15 / 80, 3)
    during = out["verifier_queue_wait_ms_during_burst"]
    assert during["samples"] == 30 and during["share_of_samples_over_target"] == round(10 / 30, 3)
    assert [d["t"] for d in out["scaling_decisions"]] == [63.2, 64.0, 70.0, 75.0, 95.0]
