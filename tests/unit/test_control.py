"""Adaptive speculation control: cost model fits, the acceptance estimator, and the controller's choices of draft
length and drafters (including a brute-force check that it finds the best batch plan)."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specfleet.engine.control import (
    AcceptanceTracker,
    CostModel,
    Plan,
    SpeculationController,
    expected_tokens,
)

CHEAP_DRAFTS = CostModel(draft_prior=(1e-3, 1e-5), verify_prior=(2e-2, 1e-4))


def controller(alpha: float = 0.6, cost: CostModel | None = None, drafters=("a",), **options):
    return SpeculationController(list(drafters), cost=cost or CHEAP_DRAFTS, alpha_prior=alpha, **options)


def with_alpha(ctl: SpeculationController, rids, alpha: float) -> None:
    for rid in rids:
        ctl.trackers[rid] = AcceptanceTracker(alpha_prior=alpha, prior_weight=1e6)  # pinned alpha


def k_of(ctl, rids, **kwargs) -> int:
    return ctl.decide(rids, **kwargs)[rids[0]].k


# --- expected tokens and the cost model -----------------------------------------------------------------------


def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(0.8, 0) == 1.0


def test_cost_model_priors_are_sane():
    cost = CostModel()
    assert 0 < cost.draft_time(1, 1, 1) < cost.verify_time(1)
    assert cost.verify_time(100) > cost.verify_time(1) > 0
    assert cost.draft_time(8, 2, 4) == pytest.approx(2 * 4 * cost.draft_time(8, 1, 1))
    assert cost.draft_time(0, 1, 4) == cost.draft_time(4, 1, 0) == cost.verify_time(0) == 0.0


def test_cost_model_converges_to_a_linear_function():
    cost = CostModel()
    for _ in range(8):  # a window's worth of observations over a range of sizes overrules the prior
        for tokens in [1, 7, 33, 64, 100, 250, 3, 512]:
            cost.observe_verify(tokens, 0.015 + 3e-5 * tokens)
        for batch in [1, 2, 4, 8, 16, 32]:
            cost.observe_draft(batch, drafters=3, steps=5, seconds=3 * 5 * (0.004 + 2e-4 * batch))
    assert cost.verify.intercept == pytest.approx(0.015, rel=0.1) and cost.verify.slope == pytest.approx(3e-5, rel=0.1)
    assert cost.verify_time(1000) == pytest.approx(0.015 + 0.03, rel=0.1)
    assert cost.draft_time(10, 2, 4) == pytest.approx(2 * 4 * (0.004 + 2e-3), rel=0.1)


def test_cost_model_with_one_batch_size_scales_the_prior_and_forgets_old_points():
    cost = CostModel(verify_prior=(0.02, 2e-4), window=4)
    cost.observe_verify(10, 0.044)  # the prior says 0.022 at 10 tokens: everything twice as slow
    assert cost.verify_time(10) == pytest.approx(0.044)
    assert cost.verify.slope == pytest.approx(4e-4)
    for tokens in [10, 20, 30, 40]:  # the window holds only these
        cost.observe_verify(tokens, 0.01 + 1e-3 * tokens)
    assert cost.verify_time(25) == pytest.approx(0.035, rel=0.1)  # where it was observed, the fit follows


def test_cost_model_slope_resists_noise_at_one_size():
    """Rounds mostly of one size, timed on a noisy machine: the fitted per-token cost stays near the profiled one
    instead of swinging with the noise (the node threshold and k depend on it)."""
    import random

    rng = random.Random(0)
    cost = CostModel(verify_prior=(7e-3, 5e-4))
    for _ in range(64):
        tokens = 1 if rng.random() < 0.8 else rng.choice([2, 3])
        cost.observe_verify(tokens, (7e-3 + 5e-4 * tokens) * rng.uniform(0.6, 1.8))
    assert 2.5e-4 < cost.verify.slope < 1.2e-3


def test_parallel_drafters_cost_one_drafter():
    cost = CostModel(draft_prior=(1e-3, 0.0), parallel_drafters=True)
    assert cost.draft_time(4, 3, 2) == pytest.approx(2e-3)
    cost.observe_draft(4, drafters=3, steps=2, seconds=0.01)
    assert cost.draft_time(4, 1, 2) == pytest.approx(0.01)


# --- the acceptance tracker -----------------------------------------------------------------------------------


def test_alpha_estimator_is_the_truncated_geometric_mle():
    tracker = AcceptanceTracker(alpha_prior=0.5, prior_weight=2.0, decay=1.0)  # decay 1: plain sums
    for drafted, accepted in [(4, 4), (4, 1), (4, 0), (2, 2)]:
        tracker.observe(drafted, accepted, ["a"], None)
    # accepted positions 1 + 4 + 1 + 0 + 2 = 8 (prior 1), positions seen 2 + 4 + 2 + 1 + 2 = 11 (prior 2)
    assert tracker.alpha == pytest.approx(8 / 11)


def test_alpha_follows_recent_rounds():
    tracker = AcceptanceTracker()
    for _ in range(30):
        tracker.observe(6, 6, ["a"], None)
    assert tracker.alpha > 0.99
    for _ in range(30):
        tracker.observe(6, 0, ["a"], None)
    assert tracker.alpha < 0.01
    tracker.observe(0, 0, ["a"], None)  # drafted nothing: no evidence
    assert tracker.alpha < 0.01 and tracker.rounds_without_draft == 1


# --- the controller: draft length ------------------------------------------------------------------------------


def test_high_alpha_and_cheap_drafts_speculate_deep():
    ctl = controller(k_max=8)
    rid = "r"
    for _ in range(20):
        plan = ctl.decide([rid])[rid]
        ctl.observe(rid, plan, plan.k, plan.k, ["a"] * plan.k)
    plan = ctl.decide([rid])[rid]
    assert plan.k >= 7 and plan.drafters == ["a"]
    assert ctl.last_rates[1] > 2 * ctl.last_rates[0]


def test_hopeless_drafts_switch_off_and_probe_later():
    ctl = controller(probe_every=5, probe_k=2)
    rid = "r"
    for _ in range(40):  # every draft rejected: alpha falls until speculation switches off
        plan = ctl.decide([rid])[rid]
        if plan.k == 0:
            break
        ctl.observe(rid, plan, plan.k, 0, [])
    assert plan.k == 0 and ctl.tracker(rid).alpha < 0.2
    plans = []
    for _ in range(12):
        plan = ctl.decide([rid])[rid]
        plans.append(plan)
        ctl.observe(rid, plan, plan.k, 0, [])
    assert [p.k for p in plans[:5]] == [0] * 5 and plans[0] == Plan(0, [])
    assert plans[5] == Plan(2, ["a"], probe=True)  # probe after probe_every rounds off
    assert [p.k for p in plans[6:11]] == [0] * 5 and plans[11].probe  # failed probe: off again, probe again


def test_a_successful_probe_turns_speculation_back_on():
    ctl = controller(probe_every=3, probe_k=2)
    ctl.trackers["r"] = AcceptanceTracker(alpha_prior=0.0)  # not pinned: real observations can move it
    for _ in range(3):
        plan = ctl.decide(["r"])["r"]
        assert plan.k == 0
        ctl.observe("r", plan, 0, 0)
    resumed = []
    for _ in range(6):
        plan = ctl.decide(["r"])["r"]
        resumed.append(plan.k)
        ctl.observe("r", plan, plan.k, plan.k, ["a"] * plan.k)  # the draft is now always right
    assert resumed[0] == 2 and resumed[-1] > 2


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.95, 0.999])
def test_expensive_drafts_are_never_used(alpha):
    ctl = controller(cost=CostModel(draft_prior=(2e-2, 1e-4), verify_prior=(2e-2, 1e-4)))
    with_alpha(ctl, ["r"], alpha)
    assert ctl.decide(["r"]) == {"r": Plan(0, [])}
    assert ctl.last_rates[1] == ctl.last_rates[0]


def test_k_does_not_grow_with_batch_or_verifier_load_and_grows_with_alpha():
    for alpha in [0.3, 0.6, 0.8, 0.95]:
        ks = []
        for batch in [1, 4, 16, 64, 256]:
            ctl = controller()
            rids = [f"r{i}" for i in range(batch)]
            with_alpha(ctl, rids, alpha)
            ks.append(k_of(ctl, rids))
        assert ks == sorted(ks, reverse=True) and ks[0] > ks[-1], (alpha, ks)
        ctl = controller()
        with_alpha(ctl, ["r"], alpha)
        loaded = [k_of(ctl, ["r"], extra_verify_tokens=extra) for extra in [0, 50, 200, 1000]]
        assert loaded == sorted(loaded, reverse=True), (alpha, loaded)
    by_alpha = []
    for alpha in [0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.99]:
        ctl = controller()
        with_alpha(ctl, ["r"], alpha)
        by_alpha.append(k_of(ctl, ["r"]))
    assert by_alpha == sorted(by_alpha) and by_alpha[0] == 0 and by_alpha[-1] == ctl.k_max


def test_per_request_caps_and_empty_batches():
    ctl = controller()
    with_alpha(ctl, ["a", "b", "c"], 0.95)
    plans = ctl.decide(["a", "b", "c"], max_k={"a": 2, "b": 0})
    assert plans["a"].k == 2 and plans["b"] == Plan(0, []) and plans["c"].k > 2
    assert ctl.decide([]) == {}


@settings(max_examples=60, deadline=None)
@given(alphas=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3),
       draft=st.tuples(st.floats(0.0, 0.02), st.floats(0.0, 1e-3)),
       verify=st.tuples(st.floats(1e-3, 0.05), st.floats(0.0, 2e-3)),
       extra=st.integers(0, 100))
def test_controller_finds_the_best_batch_plan(alphas, draft, verify, extra):
    k_max = 4
    cost = CostModel(draft_prior=draft, verify_prior=verify)
    ctl = SpeculationController(["a"], k_max=k_max, cost=cost, min_gain=1.0)
    rids = [f"r{i}" for i in range(len(alphas))]
    for rid, alpha in zip(rids, alphas, strict=True):
        with_alpha(ctl, [rid], alpha)
    alphas = [ctl.trackers[rid].alpha for rid in rids]

    def rate(ks):  # the extra tokens are other useful work in the same forward
        speculating = sum(1 for k in ks if k)
        seconds = cost.draft_time(speculating, 1, max(ks)) + cost.verify_time(len(ks) + extra + sum(ks))
        return (extra + sum(expected_tokens(a, k) for a, k in zip(alphas, ks, strict=True))) / seconds

    plans = ctl.decide(rids, extra_verify_tokens=extra)
    chosen = rate([plans[rid].k for rid in rids])
    best = max(rate(ks) for ks in itertools.product(range(k_max + 1), repeat=len(rids)))
    assert chosen >= best * (1 - 1e-6)
    assert chosen >= rate([0] * len(rids)) * (1 - 1e-9)  # never slower than plain decoding
    assert ctl.last_rates[1] == pytest.approx(chosen)


def test_decisions_are_deterministic():
    def run():
        ctl = controller(drafters=("a", "b", "c"))
        history = []
        for step in range(40):
            plans = ctl.decide(["x", "y"], extra_verify_tokens=step % 7)
            history.append(plans)
            for rid, plan in plans.items():
                accepted = min(plan.k, (step * 3 + len(rid)) % 5)
                ctl.observe(rid, plan, plan.k, accepted, plan.drafters[:1] * accepted)
        return history

    assert run() == run()


# --- the controller: drafters ------------------------------------------------------------------------------------


def test_routing_keeps_the_best_drafter_and_explores_the_others():
    ctl = controller(alpha=0.95, drafters=("a", "b", "c"), explore_every=4)
    with_alpha(ctl, ["r"], 0.95)
    chosen = []
    for _ in range(40):
        plan = ctl.decide(["r"])["r"]
        chosen.append(plan.drafters)
        # a proposes every accepted token; c agrees with a; b never helps
        credit = [("a", "c") if "c" in plan.drafters else ("a",)] * plan.k
        ctl.observe("r", plan, plan.k, plan.k, credit)
    assert chosen[0] == chosen[1] == ["a", "b", "c"]  # warm-up rounds fuse everyone
    late = chosen[20:]
    assert ["a"] in late  # c only agrees with a: no unique contribution, not worth a step
    assert all("a" in names for names in late)
    explored = [names for names in late if len(names) == 3]
    assert explored and len(explored) <= len(late) // 4 + 1  # everyone re-fused now and then, not kept


def test_a_drafter_with_unique_accepted_tokens_is_kept_beside_the_best():
    tracker = AcceptanceTracker()
    for _ in range(10):
        tracker.observe(4, 4, ["a", "b"], [("a",)] * 3 + [("b",)])  # b alone carries a quarter of the tokens
    assert tracker.active_drafters(["a", "b"], keep_share=0.2, explore_every=0) == ["a", "b"]
    for _ in range(20):
        tracker.observe(4, 4, ["a", "b"], [("a", "b")] * 4)  # b only agrees now
    assert tracker.active_drafters(["a", "b"], keep_share=0.2, explore_every=0) == ["a"]
    nobody = AcceptanceTracker()
    for _ in range(20):
        nobody.observe(4, 2, ["a", "b"], None)
    assert nobody.active_drafters(["a", "b"], keep_share=0.2, explore_every=0) == ["a", "b"]  # no evidence yet


def test_exploration_ends_after_the_warm_up_even_when_no_draft_is_accepted():
    # fusion rounds that accept nothing still rank (nobody helped): the warm-up ends, then the routed drafter alone
    # (the first before any evidence) with every pool re-fused every explore_every-th round; before, a request whose
    # drafts were never accepted called every pool every round
    tracker = AcceptanceTracker()
    rounds = []
    for _ in range(24):
        names = tracker.active_drafters(["a", "b", "c"], keep_share=0.2, explore_every=8)
        rounds.append(names)
        tracker.observe(4, 0, names, [], explored=len(names) == 3)
    assert rounds[0] == rounds[1] == ["a", "b", "c"]
    explored = [0, 1, 9, 17]  # every explore_every-th round after the last exploration (finding nothing: no backoff)
    assert [i for i, names in enumerate(rounds) if len(names) == 3] == explored
    assert all(names == ["a"] for i, names in enumerate(rounds) if i not in explored)
    assert tracker.share == {} and tracker.unique == {}  # no share earned by anyone


def test_forget_drops_the_request_state():
    ctl = controller()
    plan = ctl.decide(["r"])["r"]
    ctl.observe("r", plan, plan.k, 0, [])
    ctl.forget("r")
    ctl.forget("never-seen")
    assert "r" not in ctl.trackers


def test_probes_are_priced_staggered_and_bounded():
    """Many requests off at once do not all probe in one round: probes are paid from a budget of probe_share of
    the plain rounds' time (by the cost model), one request at a time, the longest off first."""
    cost = CostModel(draft_prior=(2e-3, 1e-3), verify_prior=(1e-2, 1e-3))
    ctl = controller(cost=cost, probe_every=4, probe_k=2, probe_share=0.05)
    rids = [f"r{i}" for i in range(8)]
    with_alpha(ctl, rids, 0.0)
    probes_per_round, spent, plain = [], 0.0, 0.0
    for _ in range(200):
        plans = ctl.decide(rids)
        probing = [rid for rid, plan in plans.items() if plan.probe]
        probes_per_round.append(len(probing))
        plain += cost.verify_time(len(rids))
        for rid, plan in plans.items():
            if plan.probe:
                spent += cost.draft_time(1, 1, plan.k) + cost.verify_seconds_per_token() * plan.k
            ctl.observe(rid, plan, plan.k, 0, [])
    assert max(probes_per_round) <= 2 and sum(probes_per_round) > 0
    assert spent <= 0.05 * plain
    # with the old fixed schedule every request would probe every 5th round: 8 * 200 / 5 = 320 probes
    assert sum(probes_per_round) < 100


# --- the controller: what a round costs when speculation is off -------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(alphas=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8),
       caps=st.lists(st.integers(0, 6), min_size=8, max_size=8),
       draft=st.tuples(st.floats(0.0, 0.02), st.floats(0.0, 2e-3)),
       verify=st.tuples(st.floats(1e-3, 0.05), st.floats(0.0, 5e-3)),
       extra=st.integers(0, 40), drafters=st.integers(1, 3),
       lengths=st.none() | st.lists(st.integers(0, 400), min_size=8, max_size=8))
def test_the_fast_path_plans_exactly_as_the_full_computation(alphas, caps, draft, verify, extra, drafters, lengths):
    """`_hopeless` only skips the per-depth Dinkelbach where it would plan nothing: same plans, same rates (with the
    drafters' catch-up priced too, when the context lengths are given)."""
    names = ["a", "b", "c"][:drafters]

    def run(fast: bool):
        ctl = SpeculationController(names, k_max=4, cost=CostModel(draft_prior=draft, verify_prior=verify))
        if not fast:
            ctl._hopeless = lambda *args: False
        rids = [f"r{i}" for i in range(len(alphas))]
        for rid, alpha in zip(rids, alphas, strict=False):
            with_alpha(ctl, [rid], alpha)
        plans = ctl.decide(rids, extra_verify_tokens=extra, max_k=dict(zip(rids, caps, strict=False)),
                           lengths=None if lengths is None else dict(zip(rids, lengths, strict=False)))
        return plans, ctl.last_rates

    assert run(True) == run(False)


def test_a_round_with_speculation_off_runs_no_dinkelbach():
    ctl = controller(drafters=("a", "b"))
    rids = [f"r{i}" for i in range(32)]
    with_alpha(ctl, rids, 0.02)

    def refuse(*args):
        raise AssertionError("Dinkelbach ran although no request can gain from drafting")

    ctl._best_for_depth = refuse
    assert all(plan == Plan(0, []) for plan in ctl.decide(rids).values())
    with_alpha(ctl, rids[:1], 0.99)  # one request worth drafting for: the full computation again
    with pytest.raises(AssertionError, match="Dinkelbach ran"):
        ctl.decide(rids)


def test_the_probes_catch_up_is_paid_from_the_probe_budget():
    """A probe whose drafters had to catch up on many missed tokens costs more than its draft levels: charged to
    the budget afterwards, it delays the next probe, so probing stays near probe_share of the time."""
    def probe_rounds(charge: float) -> list[int]:
        cost = CostModel(draft_prior=(2e-3, 1e-3), verify_prior=(1e-2, 1e-3))
        ctl = controller(cost=cost, probe_every=4, probe_k=2, probe_share=0.05)
        rids = [f"r{i}" for i in range(8)]
        with_alpha(ctl, rids, 0.0)
        rounds = []
        for step in range(200):
            plans = ctl.decide(rids)
            if any(plan.probe for plan in plans.values()):
                rounds.append(step)
                ctl.charge_probes(charge)
            for rid, plan in plans.items():
                ctl.observe(rid, plan, plan.k, 0, [])
        return rounds

    free, charged = probe_rounds(0.0), probe_rounds(0.02)  # 0.02 s: two plain rounds of this batch
    assert free and charged and len(charged) < len(free) / 2



def test_a_new_request_starts_from_what_recent_requests_of_its_kind_accepted():
    """Greedy requests accepting every level and sampled ones accepting none: a new sampled request starts low and
    a new greedy one high (one shared figure would start both in between); without kinds, the shared figure."""
    ctl = controller(alpha=0.6)
    kinds = {"g1": "greedy", "s1": "sampled"}
    for _ in range(40):
        plans = ctl.decide(["g1", "s1"], kinds=kinds)
        ctl.observe("g1", Plan(2, ["a"]), 2, 2)
        ctl.observe("s1", Plan(2, ["a"]), 2, 0)
        assert plans["g1"].k >= 0
    ctl.decide(["g2", "s2", "x"], kinds={"g2": "greedy", "s2": "sampled"})
    assert ctl.trackers["g2"].alpha > 0.8 and ctl.trackers["s2"].alpha < 0.4
    assert ctl.trackers["x"].alpha == pytest.approx(0.6)  # no kind given: the shared figure (observed by none)
    ctl.forget("s2")
    assert "s2" not in ctl.kind_of


def test_explorations_that_confirm_the_best_drafter_space_out_and_a_change_resets_them():
    from specfleet.engine.control import MAX_EXPLORE_BACKOFF

    tracker = AcceptanceTracker()
    names = ["a", "b", "c"]
    explored_at = []
    for step in range(200):
        exploring = tracker.exploring(names, explore_every=4)
        if exploring:
            explored_at.append(step)
        drafters = names if exploring else ["a"]
        tracker.observe(3, 3, drafters, [("a",)] * 3, explored=exploring)  # a stays the best throughout
    gaps = [b - a for a, b in zip(explored_at, explored_at[1:], strict=False)]
    # warm-up (its second round already confirms a), then 8, 16, ... up to the cap
    assert gaps[:2] == [1, 8] and max(gaps) == 4 * MAX_EXPLORE_BACKOFF
    assert gaps == sorted(gaps)
    assert tracker.explore_backoff == MAX_EXPLORE_BACKOFF
    tracker.observe(3, 3, names, [("b",)] * 3, explored=True)  # the text changed: b is now the best
    assert tracker.explore_backoff == 1 and tracker.since_explore == 0
    tracker.observe(3, 0, names, [], explored=True)  # an exploration that finds nothing also starts over
    assert tracker.explore_backoff == 1


def test_a_new_request_starts_from_its_kinds_drafter_shares_once_they_have_evidence():
    from specfleet.engine.control import INHERIT_AFTER

    ctl = controller(alpha=0.95, drafters=("a", "b", "c"), explore_every=4)
    first = ctl.decide(["r0"], kinds={"r0": "sampled"})["r0"]
    assert first.drafters == ["a", "b", "c"]  # nothing known yet: the warm-up fuses everyone
    rounds = 0
    while ctl.overall_of["sampled"].fusion_rounds < INHERIT_AFTER:
        rid = f"r{rounds // 3}"  # short requests: each one's first rounds are warm-up fusions
        plan = ctl.decide([rid], kinds={rid: "sampled"})[rid]
        ctl.observe(rid, plan, plan.k, plan.k, [("b",)] * plan.k)  # b drafts every accepted token
        rounds += 1
    plan = ctl.decide(["new"], kinds={"new": "sampled"})["new"]
    assert plan.drafters == ["b"]  # routed to the kind's best at once, no warm-up fusion
    other = ctl.decide(["greedy"], kinds={"greedy": "greedy"})["greedy"]
    assert other.drafters == ["a", "b", "c"]  # another kind has no evidence of its own yet


# --- the drafters' catch-up: tokens committed while a request did not draft ----------------------------------------

# a draft level costs 0.2 ms a request, a verified token 0.5 ms: a plain round of 8 requests ~9 ms
CATCH_UP_COST = CostModel(draft_prior=(5e-4, 2e-4), verify_prior=(5e-3, 5e-4))


def test_drafting_prices_the_drafters_catch_up():
    """A request whose drafters are far behind (a long prompt, or many rounds off) pays their prefill before its
    first draft: where drafting gains only a little, that keeps it off; once its drafters are caught up (they drafted
    at its current length), the same alpha drafts."""
    rids = [f"r{i}" for i in range(8)]

    def speculating(length: int, drafted_upto: int) -> int:
        ctl = controller(cost=CATCH_UP_COST)
        with_alpha(ctl, rids, 0.8)
        for rid in rids:
            ctl.trackers[rid].drafted_upto = drafted_upto
        return sum(plan.k > 0 for plan in ctl.decide(rids, lengths={rid: length for rid in rids}).values())

    assert speculating(600, 0) == 0  # 600 tokens to catch up: 120 ms a request, far over what its drafts gain
    assert speculating(600, 599) == len(rids)  # one token behind: the drafts pay
    ctl = controller(cost=CATCH_UP_COST)
    with_alpha(ctl, rids, 0.8)
    assert all(plan.k > 0 for plan in ctl.decide(rids).values())  # no lengths given: no catch-up priced
    cheap = CostModel(draft_prior=(5e-4, 2e-4), verify_prior=(5e-3, 5e-4))
    cheap.catch_up_token = 1e-7  # profiled: a prefill token nearly free (a GPU reads the weights once for all)
    ctl = controller(cost=cheap)
    with_alpha(ctl, rids, 0.8)
    assert all(plan.k > 0 for plan in ctl.decide(rids, lengths={rid: 600 for rid in rids}).values())


def test_a_round_that_drafts_records_what_the_drafters_caught_up_to():
    ctl = controller(cost=CATCH_UP_COST)
    with_alpha(ctl, ["on"], 0.8)
    with_alpha(ctl, ["off"], 0.0)
    plans = ctl.decide(["on", "off"], lengths={"on": 40, "off": 40})
    assert plans["on"].k > 0 and plans["off"].k == 0
    assert ctl.trackers["on"].drafted_upto == 40  # its drafters hold its context now
    assert ctl.trackers["off"].drafted_upto == 0  # still behind by its whole context
    tracker = ctl.trackers["on"]
    assert ctl.catch_up_seconds(tracker, 43, 1) == pytest.approx(3 * CATCH_UP_COST.draft_seconds_per_request(1, 1))


def test_probes_of_requests_far_behind_are_rarer():
    """A probe prices its drafters' catch-up (the tokens the request committed while off, each drafter's prefill) up
    front: probes of requests far behind come at the rate the budget pays for them, not at the probe interval."""
    def probes(length_of) -> int:
        ctl = controller(cost=CATCH_UP_COST, probe_every=4, probe_k=2, probe_share=0.05)
        rids = [f"r{i}" for i in range(8)]
        with_alpha(ctl, rids, 0.0)
        count = 0
        for step in range(200):
            plans = ctl.decide(rids, lengths={rid: length_of(rid, step) for rid in rids})
            count += sum(plan.probe for plan in plans.values())
            for rid, plan in plans.items():
                ctl.observe(rid, plan, plan.k, 0, [])
        return count

    near = probes(lambda rid, step: 0)  # the drafters never behind (as in the controller without lengths)
    far = probes(lambda rid, step: 60 + step)  # a 60-token prompt the drafters never saw, one token a round
    assert near > 0 and 0 < far < near / 3


def test_the_measured_catch_up_settles_the_priced_one():
    """charge_probes after a round charges what the catch-up cost beyond the price the plan already paid (or refunds
    what it cost less): measured at its price, the budget is as the plan left it."""
    ctl = controller(cost=CATCH_UP_COST, probe_every=1, probe_k=2, probe_share=1.0)
    with_alpha(ctl, ["r"], 0.0)
    ctl.observe("r", Plan(0), 0, 0)
    ctl.probe_credit = 1.0
    priced = ctl.catch_up_seconds(ctl.trackers["r"], 100, 1)  # 100 tokens behind
    plans = ctl.decide(["r"], lengths={"r": 100})
    assert plans["r"].probe and priced > 0 and ctl.catch_up_seconds(ctl.trackers["r"], 100, 1) == 0.0
    assert ctl._priced_catch_up == pytest.approx(priced)  # paid from the credit already, with its levels
    credit = ctl.probe_credit
    ctl.charge_probes(priced)
    assert ctl.probe_credit == pytest.approx(credit)
    ctl.probe_credit = credit
    ctl._priced_catch_up = priced
    ctl.charge_probes(priced + 0.01)
    assert ctl.probe_credit == pytest.approx(credit - 0.01)


def _run_rounds(ctl, rounds: int, spec_seconds_per_token: float, plain_seconds_per_token: float) -> list[int]:
    """Runs `rounds` batch-1 rounds whose clock gives each mode its own seconds per token (a draft of k levels
    commits k + 1 tokens); returns each round's k."""
    ks = []
    for _ in range(rounds):
        plan = ctl.decide(["r"])["r"]
        ks.append(plan.k)
        ctl.observe("r", plan, plan.k, plan.k, ["a"] * plan.k)
        tokens = plan.k + 1
        ctl.observe_round(1, {"r": plan}, tokens * (spec_seconds_per_token if plan.k else plain_seconds_per_token),
                          tokens)
    return ks


def test_speculation_the_clock_says_is_slower_than_plain_turns_off_and_is_rechecked():
    """The cost model expects drafts to pay (cheap drafts, every one accepted), but the rounds' clock says a
    speculative round costs more per committed token than a plain one: after a burst measuring plain decoding the
    controller runs plain, re-trying speculation in a burst each period; when speculation gets faster than plain,
    the next burst brings it back."""
    from specfleet.engine.control import RealizedRates

    ctl = controller(k_max=4)
    window, period = RealizedRates.WINDOW, RealizedRates.PERIOD
    first = _run_rounds(ctl, 1 + period, spec_seconds_per_token=0.006, plain_seconds_per_token=0.004)
    # as planned for a period (a short run is never interrupted), then a burst of plain rounds measures plain decoding
    assert all(first[:1 + period - window]) and first[-window:] == [0] * window
    off = _run_rounds(ctl, 2 * period, spec_seconds_per_token=0.006, plain_seconds_per_token=0.004)
    # plain, speculation re-checked in a burst each period
    assert sum(1 for k in off if k) <= 2 * window and off[-period // 2:].count(0) >= period // 2 - window
    # faster speculation (a better draft, a quieter machine): the next burst brings it back for good
    back = _run_rounds(ctl, 5 * period, spec_seconds_per_token=0.002, plain_seconds_per_token=0.004)
    assert back[-period:].count(0) <= window  # at most a burst re-measuring plain decoding


def test_without_round_reports_the_plans_are_the_models():
    """A controller nobody reports rounds to (the fleet's router) plans as the cost model says, every round."""
    ctl = controller(k_max=4)
    for _ in range(3 * 24):
        plan = ctl.decide(["r"])["r"]
        assert plan.k > 0
        ctl.observe("r", plan, plan.k, plan.k, ["a"] * plan.k)


def test_leaf_exploration_backs_off_while_nothing_pays_and_resets_when_something_does():
    """LeafPricer: optional nodes that do not pay are re-tried one round in EXPLORE_EVERY, then ever more rarely
    (each exploration doubles the interval, up to MAX_BACKOFF times); a role that pays brings the interval back."""
    from specfleet.engine.control import LeafPricer

    every, most = LeafPricer.EXPLORE_EVERY, LeafPricer.EXPLORE_EVERY * LeafPricer.MAX_BACKOFF
    pricer = LeafPricer(pricing=lambda: (300.0, 1e-3, 0.0))
    rounds = [i for i in range(1, 6 * most) if pricer.exploring("sampled")]
    gaps = [b - a for a, b in zip([0] + rounds[:-1], rounds, strict=True)]
    assert gaps[:4] == [every, 2 * every, 4 * every, 8 * every] and set(gaps[4:]) == {most}
    assert pricer.exploring("greedy") is False  # kinds count apart
    pricer.paid("sampled")
    assert [pricer.exploring("sampled") for _ in range(every)].count(True) == 1


def test_rounds_that_only_look_up_are_checked_against_the_clock_too():
    """Free lookups (a suffix tree) draft whatever the plan: a round with lookups counts as speculative, and when
    such rounds measured slower than plain ones the controller makes rounds plain, lookups included (forced_plain)."""
    from specfleet.engine.control import RealizedRates

    ctl = controller(alpha=0.01, k_max=4)  # the models never pay: every plan is k = 0
    forced = []
    for _ in range(3 * RealizedRates.PERIOD):
        plan = ctl.decide(["r"], lookups=True)["r"]
        assert plan.k == 0
        forced.append(ctl.forced_plain)
        looked = not ctl.forced_plain
        ctl.observe_round(1, {"r": plan}, 0.006 if looked else 0.004, 1, drafted=looked)
    assert not any(forced[:RealizedRates.PERIOD - RealizedRates.WINDOW])  # lookups until plain is measured
    assert forced[-RealizedRates.PERIOD:].count(True) >= RealizedRates.PERIOD - RealizedRates.WINDOW
