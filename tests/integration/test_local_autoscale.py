"""`specfleet up --autoscale` end to end: the operator's control loop on local processes grows the verifiers under
load and drains and stops them when it falls, with no request lost and every output the target's greedy one."""

import pytest

from specfleet.bench.autoscale_bench import run
from specfleet.local.autoscale import LocalReplicas, local_spec, role_args


def test_role_args_and_local_spec():
    assert role_args("drafter-python") == ["drafter", "--pool", "python"]
    assert role_args("verifier") == ["verifier"]
    with pytest.raises(ValueError, match="router"):
        role_args("router")
    spec = local_spec(["python", "suffix"], verifiers=1, max_verifiers=3, max_drafters=2, interval_s=1.0)
    bounds = {r.key: (r.min_replicas, r.max_replicas) for r in spec.roles}
    assert bounds["verifier"] == (1, 3) and bounds["drafter-python"] == (1, 2) and bounds["router"] == (1, 1)
    assert {r.key: r.min_replicas for r in local_spec(["suffix"], 1, 2, 1, 1.0, fusion=False).roles}["fusion"] == 0


def test_a_role_the_fleet_runs_without_never_starts():
    import asyncio

    started = []
    replicas = LocalReplicas(lambda role, pod: started.append((role, pod)))
    asyncio.run(replicas.start_replica("fusion"))
    assert started == [] and replicas.replicas("fusion") == []


def _two_verifiers_serving(lines, samples) -> bool:
    """The second verifier has heartbeated for a few seconds (the load kept running while the router found it)."""
    return sum(s["replicas"].get("verifier", 0) >= 2 for s in samples) >= 3


def _a_verifier_stopped(lines, samples) -> bool:
    return any("autoscale | stop verifier" in line for line in lines)


@pytest.mark.slow
def test_load_ramp_scales_verifiers_up_and_down_losing_nothing(models_dir, tmp_path):
    # each phase ends on what the test checks (phase_s only bounds it): load until a second verifier serves, then
    # idle until one is drained and stopped; no fixed sleeps, so a slow machine waits longer instead of failing
    report = run(models_dir, "redis://127.0.0.1:6379/0", tmp_path / "autoscale.json", ramp=(24, 0), phase_s=150,
                 new_tokens=12, pools="suffix", max_verifiers=2, interval_s=0.5, stages=("ramp",),
                 until=(_two_verifiers_serving, _a_verifier_stopped))
    assert report["requests"] > 0
    assert report["requests_lost"] == 0, report["errors"]
    assert report["outputs_differing_from_target"] == 0
    actions = [a["action"] for a in report["scaling_actions"]]
    assert any(a.startswith("verifier: 1 -> 2") for a in actions), actions
    assert any(a.startswith("stop verifier") for a in actions), actions  # drained, then stopped
    assert (tmp_path / "autoscale.png").exists()
