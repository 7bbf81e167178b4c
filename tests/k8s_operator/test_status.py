"""The status builder: counts, printer-column fields, conditions with stable transition times, and the last 20
decisions."""

from __future__ import annotations

from specfleet_operator.metrics import aggregate
from specfleet_operator.policy import Decision
from specfleet_operator.spec import FleetSpec
from specfleet_operator.status import MAX_DECISIONS, fleet_status

FLEET = FleetSpec.from_dict("demo", {"drafters": [{"name": "python"}, {"name": "c"}], "verifier": {"replicas": 2}})
DESIRED = {"router": 1, "fusion": 1, "drafter-python": 2, "drafter-c": 1, "verifier": 2}


def conditions(status):
    return {c["type"]: c for c in status["conditions"]}


def test_all_ready_is_ready_and_stable():
    sample = aggregate([{"role": "router", "pod": "r", "acceptance": 2.5},
                        {"role": "verifier", "pod": "v", "queue_wait_ms": 12.345}], {}, 0.0)
    status = fleet_status(FLEET, DESIRED, DESIRED, 100.0, generation=3, sample=sample, requested={"verifier": 2})
    assert (status["ready"], status["replicas"], status["drafterReplicas"]) == ("7/7", 2, 3)
    assert status["observedGeneration"] == 3 and status["queueWaitMs"] == 12.35 and status["acceptance"] == 2.5
    assert status["roles"]["verifier"] == {"desired": 2, "ready": 2, "requested": 2}
    found = conditions(status)
    assert (found["Ready"]["status"], found["Scaling"]["status"], found["Degraded"]["status"]) == ("True", "False",
                                                                                                   "False")


def test_transition_time_kept_until_the_status_changes():
    first = fleet_status(FLEET, DESIRED, DESIRED, 100.0)
    again = fleet_status(FLEET, DESIRED, DESIRED, 200.0, previous=first)
    assert conditions(again)["Ready"]["lastTransitionTime"] == conditions(first)["Ready"]["lastTransitionTime"]
    behind = fleet_status(FLEET, {**DESIRED, "verifier": 4}, DESIRED, 300.0, previous=again)
    assert conditions(behind)["Ready"]["status"] == "False"
    assert conditions(behind)["Ready"]["lastTransitionTime"] == "1970-01-01T00:05:00Z"
    assert "verifier: 2 -> 4" in conditions(behind)["Scaling"]["message"]


def test_degraded_reasons_and_a_removed_pool():
    previous = {"roles": {"drafter-prose": {"desired": 1, "ready": 1}}}
    status = fleet_status(FLEET, DESIRED, {**DESIRED, "verifier": 0}, 0.0, previous=previous,
                          problems=[("MetricsUnavailable", "no Redis reachable")])
    degraded = conditions(status)["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "MetricsUnavailable"
    assert "verifier has no ready pod" in degraded["message"]
    assert status["roles"]["drafter-prose"] is None  # deleted from .status by the merge patch


def test_only_the_last_decisions_are_kept():
    old = [{"time": "t", "role": "verifier", "from": 1, "to": 2, "reason": "r", "metrics": {}}] * 19
    new = [Decision(50.0, "verifier", 2, 3, "queue wait", {"queue_wait_ms": 90.0}),
           Decision(50.0, "drafter-c", 1, 2, "CoSine balance")]
    status = fleet_status(FLEET, DESIRED, DESIRED, 50.0, previous={"decisions": old}, decisions=new)
    assert len(status["decisions"]) == MAX_DECISIONS
    assert status["decisions"][-2] == {"time": "1970-01-01T00:00:50Z", "role": "verifier", "from": 2, "to": 3,
                                       "reason": "queue wait", "metrics": {"queue_wait_ms": 90.0}}
