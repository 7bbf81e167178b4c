"""The scale simulator (`specfleet simulate`): determinism, a closed-form case, the orderings the papers' systems
must keep (speculation that never hits is not faster than plain decoding; DSI is never slower), monotone capacity,
agreement with this machine's committed measurements, policy scoring and the command itself."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from specfleet_operator.simulator import autoscale, costs, engine, reproduce, systems, traces
from specfleet_operator.simulator.cli import main as simulate_main

BENCH = Path(__file__).resolve().parents[2] / "bench"
SPECULATIVE = ("specinfer", "pipeinfer", "cosine")


def _steady(cost_model, replicas, load=0.7, duration=20.0, seed=3):
    rate = load * costs.plain_capacity_tokens_per_s(cost_model) * replicas / cost_model.request.output_tokens_mean
    return traces.make("steady", cost_model, rate, duration, seed)


def _run(name, cost_model, trace, replicas, seed=0, **kwargs):
    return engine.simulate(systems.build(name, cost_model), trace, replicas, seed=seed, **kwargs)


@pytest.fixture(scope="module")
def a100():
    return costs.a100_70b()


def test_same_seed_gives_the_same_report(a100):
    first = _run("cosine", a100, _steady(a100, 4), 4, seed=5).summary()
    again = _run("cosine", a100, _steady(a100, 4), 4, seed=5).summary()
    other = _run("cosine", a100, _steady(a100, 4, seed=4), 4, seed=6).summary()
    assert first == again
    assert first != other


def test_bursty_trace_keeps_the_mean_rate_and_bursts(a100):
    steady = traces.make("steady", a100, 50.0, 600.0, seed=1)
    bursty = traces.make("bursty", a100, 50.0, 600.0, seed=1)
    assert len(bursty) == pytest.approx(len(steady), rel=0.05)
    per_10s = [np.bincount((t.arrival_s // 10).astype(int), minlength=60) for t in (steady, bursty)]
    assert per_10s[1].var() > 3 * per_10s[0].var()  # Poisson: variance = mean; bursts add the modulation's
    assert (np.diff(bursty.arrival_s) >= 0).all() and bursty.arrival_s.max() < 600.0


def test_power_of_two_routing_spreads_work_more_evenly(a100):
    trace = _steady(a100, 50, duration=30.0)
    rng = np.random.default_rng(0)
    balanced = engine.assign_power_of_two(trace, 50, costs.plain_capacity_tokens_per_s(a100), rng)
    spread = rng.integers(0, 50, len(trace))
    work = [np.bincount(a, weights=trace.output_tokens, minlength=50) for a in (balanced, spread)]
    assert work[0].std() < 0.75 * work[1].std()
    assert work[0].sum() == work[1].sum()


def test_plain_decoding_matches_the_closed_form():
    # every forward costs 10 ms whatever its size: 8 requests of 50 tokens finish after 50 rounds with 8 slots
    # (the prefill round yields the first token), and after two waves of 50 rounds with 4 slots
    flat = replace(costs.a100_70b(), target=costs.StepCost(10.0, 0.0, 0.0),
                   request=costs.RequestShape(prompt_tokens=16, output_tokens_mean=50, output_tokens_max=50,
                                              output_sigma=0.0))
    trace = traces.batch(flat, 8)
    wide = _run("plain", flat, trace, 1, max_batch=8)
    np.testing.assert_allclose(wide.finish_s, 0.5)
    np.testing.assert_allclose(wide.first_token_s, 0.01)
    assert wide.summary()["batch_tokens_per_s"] == pytest.approx(800.0)
    narrow = _run("plain", flat, trace, 1, max_batch=4).summary()
    assert narrow["batch_tokens_per_s"] == pytest.approx(400.0)
    assert narrow["makespan_s"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", SPECULATIVE)
def test_speculation_that_is_never_accepted_is_not_faster_than_plain(a100, name):
    never = a100.with_alpha(0.0)
    trace = _steady(never, 8)
    plain = _run("plain", never, trace, 8).summary()
    spec = _run(name, never, trace, 8).summary()
    assert spec["p50_latency_s"] >= plain["p50_latency_s"]
    assert spec["p99_latency_s"] >= plain["p99_latency_s"]
    offline = traces.batch(never, 64)
    assert (_run(name, never, offline, 1).summary()["batch_tokens_per_s"]
            <= _run("plain", never, offline, 1).summary()["batch_tokens_per_s"] + 1e-9)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8])
def test_dsi_is_never_slower_than_plain(a100, alpha):
    model = a100.with_alpha(alpha)
    trace = _steady(model, 8, load=0.9)
    plain = _run("plain", model, trace, 8)
    dsi = _run("dsi", model, trace, 8)
    assert np.isfinite(dsi.finish_s).all()
    plain_latency = plain.finish_s - trace.arrival_s
    dsi_latency = dsi.finish_s - trace.arrival_s
    assert dsi_latency.mean() <= plain_latency.mean() + 1e-9
    assert np.percentile(dsi_latency, 99) <= np.percentile(plain_latency, 99) + 1e-9
    if alpha == 0.0:  # nothing accepted: DSI's non-speculative thread is plain decoding
        np.testing.assert_allclose(dsi_latency, plain_latency)


@pytest.mark.parametrize("name", ["plain", "cosine"])
def test_more_replicas_never_lower_throughput(a100, name):
    # the same overloading trace (a fixed total rate) on more and more replicas
    trace = _steady(a100, 8, load=2.0, duration=15.0)
    served = [_run(name, a100, trace, r).summary()["tokens_per_s"] for r in (2, 4, 8)]
    assert served == sorted(served)


def test_cosine_beats_plain_at_moderate_load(a100):
    trace = _steady(a100, 8, load=0.6)
    assert (_run("cosine", a100, trace, 8).summary()["p50_latency_s"]
            < _run("plain", a100, trace, 8).summary()["p50_latency_s"])


@pytest.fixture(scope="module")
def reproduction():
    return {r["figure"]: r for r in reproduce.reproduce(BENCH)}


def test_local_costs_come_from_the_profile_and_the_fleet_benchmark():
    local = costs.local(BENCH)
    profile = json.loads((BENCH / "profile.json").read_text())
    fleet = json.loads((BENCH / "fleet.json").read_text())
    for point in profile["target_forward_ms"]:  # every profiled shape, plus the engine's per-request work
        b = point["batch"]
        assert float(local.target.ms(b * point["tokens"], b)) == pytest.approx(
            point["ms"] + b * local.target.overhead_ms)
    assert float(local.target.ms(1, 1)) == pytest.approx(fleet["round_overhead_ms"]["engine_round_p50"])
    between = float(local.target.ms(8 * 3, 8)) - 8 * local.target.overhead_ms  # inside the grid: interpolated
    grid = {(p["batch"], p["tokens"]): p["ms"] for p in profile["target_forward_ms"]}
    assert min(grid[4, 1], grid[16, 5]) < between < max(grid[4, 5], grid[16, 5])
    steps = profile["drafter_step_ms"]
    assert float(local.drafter.ms(4, 4)) == pytest.approx(np.mean([[p["ms"] for p in v if p["batch"] == 4][0]
                                                                   for v in steps.values()]))
    # a plain fleet round pays the measured plain round's overhead; a speculative one the orchestration the hop run
    # measured for rounds with k drafts (fleet.json's round_hops), or 3 plain rounds' where a file has no hop run
    assert local.plain_round_network_ms == pytest.approx(fleet["round_overhead_ms"]["p50"])
    hops = {r["concurrency"]: r for r in fleet.get("round_hops", {}).get("bundled", {}).get("runs", [])}
    assert local.network_ms == pytest.approx(hops[1]["hops_ms"]["orchestration"]["p50"] if 1 in hops
                                             else costs.SPECULATIVE_ROUND_HOPS * fleet["round_overhead_ms"]["p50"])
    assert local.network_ms > local.plain_round_network_ms
    # the engine drafts a level as one grouped forward of its three drafters, as the profile timed it
    groups = {len(name.split("+")): v for name, v in profile.get("drafter_group_step_ms", {}).items()}
    if 3 in groups:
        assert float(local.engine_draft_level.ms(4, 4)) == pytest.approx(
            next(p["ms"] for p in groups[3] if p["batch"] == 4))
    assert local.fleet_compute_factor >= 1.0


@pytest.mark.parametrize("figure", ["plain decoding, engine, batch 1", "speculative engine, concurrency 1",
                                    "speculative engine, concurrency 8", "fleet, concurrency 1"])
def test_reproduces_the_measured_figures_within_15_percent(reproduction, figure):
    # every measured figure comes from one machine's session: fleet.json (engine and fleet, plain and speculative,
    # with the measured round shape of its ablation) and profile.json (per-shape forward costs)
    row = reproduction[figure]
    print(f"{figure}: measured {row['measured']}, simulated {row['simulated']} ({100 * row['gap']:+.1f}%)")
    assert row["simulated"] == pytest.approx(row["measured"], rel=0.15)


def test_the_fleet_at_concurrency_8_agrees_with_both_of_its_measurements(reproduction):
    # fleet.json measures the same fleet configuration at concurrency 8 twice (throughput stage: 8 prompts; ablation,
    # adaptive control on: 12 prompts). The old pair's two differed by 41% and the check was that the simulation
    # sat between them; session 12's agree within 7% (217.9 and 203.6 tokens/s), so there is nothing to sit between
    # and the check is against both. The simulation is pessimistic there (-17% and -15%): the shared-cores model sums
    # every service's work as if on one core, and with 8 streams one request's RPC handling overlaps another's forward
    # on the second core (at 32 streams the gap grows to about -50%); docs/simulator.md
    rows = [r for name, r in reproduction.items() if name.startswith("fleet, concurrency 8")]
    assert len(rows) == 2
    low, high = sorted(r["measured"] for r in rows)
    assert high / low < 1.1
    for r in rows:
        print(f"{r['figure']}: measured {r['measured']}, simulated {r['simulated']} ({100 * r['gap']:+.1f}%)")
        assert -0.2 < r["gap"] < 0.0


def test_acceptance_alphas_come_from_the_measured_matrix():
    local = costs.local(BENCH)
    matrix = json.loads((BENCH / "acceptance.json").read_text())["matrix"]
    k = local.k
    for drafter, row in local.alpha.items():
        for domain, alpha in row.items():
            assert sum(alpha ** i for i in range(1, k + 1)) == pytest.approx(
                matrix[drafter][domain]["accepted_per_round"], abs=1e-6)
    # the routed specialists beat the generalist in their own domain, so CoSine's fused alpha is the highest
    cosine = systems.build("cosine", local).request_alpha(np.arange(len(local.domains)))
    single = systems.build("pipeinfer", local).request_alpha(np.arange(len(local.domains)))
    assert (cosine > single).all()


def test_autoscaling_scores_rank_the_static_policies_and_run_the_operators():
    local = costs.local(BENCH)
    fleet, slo_ms, results = autoscale.score_policies(local, 1, 8, 900.0, seed=1)
    by = {r.policy: r for r in results}
    assert set(by) == set(autoscale.POLICIES)
    # static at the peak (the ramp's top needs ~80% of 8: 7 replicas) meets the SLO; at the mean load it cannot
    assert by["static-peak"].slo_attainment >= by["static-mean"].slo_attainment
    assert by["static-peak"].slo_attainment > 0.95
    # on a 15-minute ramp the operator may pay a little over static-peak: it sizes for the backlog that queues while
    # its pods start and keeps a panic's size for BURST_MEMORY_S (seed 1: 3.65 against 3.5 GPU-hours, 96.9% SLO)
    assert by["static-mean"].gpu_hours < by["operator"].gpu_hours < 1.1 * by["static-peak"].gpu_hours
    assert by["static-peak"].scaling_actions == by["static-mean"].scaling_actions == 0
    for name in ("threshold", "hpa-gpu-util", "keda-queue", "knative-kpa", "operator"):
        assert by[name].scaling_actions > 0, name
        assert 1 <= min(by[name].timeline["requested"]) and max(by[name].timeline["requested"]) <= 8, name
        assert by[name].surge_to_scale_up_s is not None and by[name].surges_without_scale_up == 0, name
    assert slo_ms > 0 and fleet.capacity_tokens_per_s > 0


def test_the_operators_default_policy_beats_the_threshold_rule_at_paper_scale(a100):
    # the committed scoring (bench/simulate.json): 10 -> 1,000 verifiers on an hour's ramp; the operator's defaults
    # meet the SLO at least as often as the threshold rule, with fewer scaling actions and at most ~5% more
    # GPU-hours (docs/operator.md, "Why these defaults"; with the burst hold and backlog-ahead sizing of issue 23:
    # 99.6% against 98.6%, 2,856 against 2,751 GPU-hours, 27 against 30 actions)
    _, _, results = autoscale.score_policies(a100, 10, 1000, 3600.0, seed=0, policies=("threshold", "operator"))
    threshold, operator = results
    print(threshold.summary(), operator.summary())
    assert operator.slo_attainment >= threshold.slo_attainment
    assert operator.gpu_hours <= 1.05 * threshold.gpu_hours
    assert operator.scaling_actions < threshold.scaling_actions


class _MostAtTheFirstMiss:
    """A yardstick, not a policy: asks for the most pods the first second a request arriving then would miss the
    SLO (the queue wait over the SLO's slack, 0.5 x a request's full-batch decode time: the SLO is 1.5 x the
    full-batch time per token), and never scales down. Any policy that waits for the SLO to be missed before it
    acts does no better; one that reads the queue earlier should."""

    period_s = 1.0

    def __init__(self, high, slack_ms):
        self.high, self.slack_ms = high, slack_ms
        self.acted = False

    def decide(self, obs):
        self.acted = self.acted or obs.queue_wait_ms > self.slack_ms
        return self.high if self.acted else obs.requested


def _most_at_the_first_miss(model, seeds):
    """Mean SLO attainment of `_MostAtTheFirstMiss` over `seeds` on the 1 -> 4 verifier 5-minute ramp."""
    scores = []
    for seed in seeds:
        fleet = autoscale.measure_fleet(model, seed)
        trace = traces.make("ramp", model, autoscale.peak_rate(model, fleet, 4), 300.0, seed)
        slack_ms = 0.5 * fleet.full_s_per_token * float(np.mean(trace.output_tokens)) * 1e3
        scores.append(autoscale.run_policy("most-at-first-miss", _MostAtTheFirstMiss(4, slack_ms), trace, fleet, 1,
                                           1.5 * fleet.full_s_per_token * 1e3).slo_attainment)
    return float(np.mean(scores))


def _five_minute_ramp(model, seeds, policies=("threshold", "operator")):
    """Mean SLO attainment per policy over `seeds` on the 1 -> 4 verifier 5-minute ramp (a pod serving 60 s after
    it is asked for)."""
    scores = {name: [] for name in policies}
    for seed in seeds:
        _, _, results = autoscale.score_policies(model, 1, 4, 300.0, seed=seed, policies=policies)
        for result in results:
            scores[result.policy].append(result.slo_attainment)
    return {name: float(np.mean(values)) for name, values in scores.items()}


@pytest.mark.parametrize("preset", ["local", "a100-70b"])
def test_panic_keeps_up_with_a_five_minute_ramp(a100, preset):
    # 1 -> 4 verifiers, the load peaking 150 s in, a pod serving 60 s after it is asked for: averaged over seeds,
    # the operator meets the SLO at least as often as the threshold rule, whose fixed step of 2 acts on the first
    # high sample. One seed is a coin toss at this scale (the local ramp has ~350 requests, its first pod saturates
    # ~40 s in, and whether a 10-s tick falls on one of the first requests decides a whole provisioning time;
    # seeds 0-7, local: operator 70.7% against the threshold rule's 66.7% (90.2% and 78.2% with the old pair),
    # a100-70b 77.9% against 64.2%)
    model = a100 if preset == "a100-70b" else costs.get_preset("local", BENCH)
    means = _five_minute_ramp(model, range(8))
    assert means["operator"] >= means["threshold"], means


@pytest.mark.parametrize("alpha_scale", [0.9, 1.0, 1.1])
def test_the_five_minute_ramp_holds_when_the_measured_acceptance_moves(alpha_scale):
    # the local preset's capacity follows bench/acceptance.json: re-measuring it after more training of the draft
    # head (capacity -0.9%) once flipped a one-seed comparison (0.955 against 0.677 became 0.861 against 0.942).
    # With every alpha scaled by 0.9..1.1, the operator keeps beating the threshold rule and the ideal reactive
    # reference (exact arrivals every second, no smoothing) on the mean of 8 seeds
    local = costs.get_preset("local", BENCH)
    model = replace(local, alpha={drafter: {domain: min(0.99, alpha * alpha_scale) for domain, alpha in row.items()}
                                  for drafter, row in local.alpha.items()})
    means = _five_minute_ramp(model, range(8), ("threshold", "ideal-reactive", "operator"))
    assert means["operator"] >= means["threshold"], means
    assert means["operator"] >= means["ideal-reactive"], means
    # it acts on the queue before requests miss the SLO: it beats jumping to the most pods at the first miss (seeds
    # 0-7: 61.6%, 61.1%, 61.3%); the test's own yardstick, from the model's SLO, whatever the measured speeds
    assert means["operator"] > _most_at_the_first_miss(model, range(8)), means
    # The SLO is 1.5x the measured full-batch time per token, so it follows the measurements: with the old pair
    # (bench/fleet.json and profile.json before session 12) it left a request ~12 s of queue wait and the operator
    # held ~90% (seeds 0-7: 92.1%, 90.2%, 94.3%; the bound was 0.88). Session 12's ~4x faster forwards leave ~3.3 s
    # against the same 60-s cold start, as at paper scale (6.5 s at a100-70b, where the operator gets ~78% on this
    # ramp): no policy that waits for the load holds 88% (ideal-reactive, exact arrivals every second: 47-52%).
    # Seeds 0-7 now: 72.7%, 70.7%, 74.0% at 0.9, 1.0, 1.1; the floor guards against a regression, the comparisons
    # above carry the test (docs/simulator.md, "Autoscaling scores")
    assert means["operator"] >= 0.65, means


def test_the_command_writes_the_report_and_plots(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert simulate_main(["--preset", "h100-70b", "--replicas", "1,2", "--trace", "steady,bursty", "--duration", "5",
                          "--autoscale-min", "2", "--autoscale-max", "20", "--autoscale-duration", "600",
                          "--autoscale-traces", "on-off,ramp-5m", "--autoscale-scales", "4,10",
                          "--autoscale-seeds", "0,1",
                          "--output", str(out), "--plot", str(tmp_path / "sim.png"), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert {(r["trace"], r["replicas"], r["system"]) for r in report["results"]} == {
        (t, n, s) for t in ("steady", "bursty") for n in (1, 2) for s in systems.SYSTEMS}
    assert all(r["speedup_p50"] for r in report["results"])
    assert [r["policy"] for r in report["autoscale"]["results"]] == list(autoscale.POLICIES)
    grid = report["autoscale"]["grid"]
    assert grid["scales"] == [[1, 4], [1, 10]] and grid["seeds"] == [0, 1]
    assert {(r["trace"], r["max_replicas"], r["policy"]) for r in grid["rows"]} == {
        (t, n, p) for t in ("on-off", "ramp-5m") for n in (4, 10) for p in autoscale.POLICIES}
    assert (tmp_path / "sim.png").stat().st_size > 0 and (tmp_path / "sim-autoscale.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "at 2 replicas" in printed and "GPU-hours" in printed
    assert "autoscaling grid" in printed and "surge->up s" in printed and "knative-kpa" in printed


@pytest.mark.parametrize("field, replay", [("engine_rounds", "engine_rounds"), ("fleet_rounds", "fleet_rounds")])
def test_each_side_is_replayed_with_its_own_round_shape_where_the_benchmark_recorded_it(field, replay):
    # engine_rounds: the engine drafts its suffix tree every greedy round, the fleet's router does not; fleet_rounds:
    # the ablation's shape is the fleet's at 8 streams, and its adaptive control speculates in another share of the
    # rounds at 1 or 32. A throughput row's own shape replaces the ablation's where a file has one.
    fleet = json.loads((BENCH / "fleet.json").read_text())
    row = {k: v for k, v in fleet["throughput"][0].items() if k != field}
    replayed = getattr(reproduce, replay)
    # files without it: the fleet's adaptive shape for the fleet; for the engine, which speculates every greedy
    # round, the fleet's shape when it speculates every round (the k-fixed ablation row)
    fallback = reproduce.speculating_rounds if field == "engine_rounds" else reproduce.measured_rounds
    assert replayed(fleet, row, 4) == fallback(fleet, 4)
    assert reproduce.speculating_rounds(fleet, 4).speculative_share == 1.0
    assert 0 < reproduce.measured_rounds(fleet, 4).speculative_share < 1.0
    row[field] = {"accepted_per_round": 1.5, "draft_tokens_per_round": 4.0}
    shape = replayed(fleet, row, 4)
    assert (shape.accepted, shape.draft_tokens) == (1.5, 4.0) and 0 < shape.depth <= 4
