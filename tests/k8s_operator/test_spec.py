"""FleetSpec parses a SpecFleet spec with the CRD's own defaults, so the operator behaves the same whether or not
the API server filled them in."""

from __future__ import annotations

import copy

import pytest

from specfleet_operator.spec import FleetSpec, SpecError

from .crd_schema import apply_defaults, spec_schema
from .test_crd import FULL_SPEC


def server_defaulted(spec: dict) -> dict:
    resource = apply_defaults(spec_schema(), {"spec": copy.deepcopy(spec)})
    return resource["spec"]


@pytest.mark.parametrize("spec", [{}, FULL_SPEC, {"drafters": [{"name": "c"}, {"name": "suffix", "model": ""}]}])
def test_python_defaults_equal_crd_defaults(spec):
    assert FleetSpec.from_dict("demo", spec) == FleetSpec.from_dict("demo", server_defaulted(spec))


def test_roles_in_order_with_bounds():
    fleet = FleetSpec.from_dict("demo", FULL_SPEC)
    assert fleet.role_keys == ("router", "fusion", "drafter-python", "drafter-suffix", "verifier")
    verifier = fleet.role("verifier")
    assert (verifier.replicas, verifier.min_replicas, verifier.max_replicas, verifier.gpu) == (3, 1, 8, True)
    assert [pool.pool for pool in fleet.pools] == ["python", "suffix"]
    assert fleet.role("drafter-suffix").gpu is False and fleet.role("drafter-python").model == "drafter-python"
    assert fleet.autoscaling.speculation_parallelism and fleet.autoscaling.k == 6
    assert fleet.autoscaling.targets.queue_wait_ms == 20.5 and fleet.autoscaling.window_up_s == 0
    assert fleet.redis_secret_name == "redis-url"
    assert FleetSpec.from_dict("demo", {}).redis_secret_name == "demo-redis"
    assert verifier.clamp(0) == 1 and verifier.clamp(99) == 8


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"verifier": {"minReplicas": 3, "maxReplicas": 2}}, "spec.verifier: minReplicas (3) must be <= maxReplicas"),
        ({"router": {"replicas": -1}}, "spec.router.replicas must be an integer >= 0"),
        ({"drafters": []}, "spec.drafters must be a non-empty list"),
        ({"drafters": [{"name": "py"}, {"name": "py"}]}, "is used by two pools"),
        ({"drafters": [{"name": "Py_thon"}]}, "spec.drafters[0].name must be a DNS label"),
        ({"models": {"source": "pvc"}}, "claimName is empty"),
        ({"redis": {"mode": "external"}}, "neither spec.redis.url nor spec.redis.secretRef.name"),
        ({"redis": {"mode": "cluster"}}, "spec.redis.mode must be one of inCluster, external"),
        ({"autoscaling": {"targets": {"gpuUtilizationPercent": 0}}}, "must be a number > 0"),
    ],
)
def test_bad_specs_name_the_field(spec, message):
    with pytest.raises(SpecError, match=None) as raised:
        FleetSpec.from_dict("demo", spec)
    assert message in str(raised.value)
