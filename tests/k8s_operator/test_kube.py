"""The API client's pure parts: drift detection ignores what the server adds, label matching, object paths."""

from __future__ import annotations

import pytest

from specfleet_operator.kube import drifted, matches, object_path


def test_drift_ignores_server_added_fields_but_not_changes():
    desired = {"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "v", "image": "a:1"}]}}}}
    live = {"metadata": {"uid": "x"}, "spec": {"replicas": 2, "strategy": {}, "template": {"spec": {
        "containers": [{"name": "v", "image": "a:1", "terminationMessagePath": "/dev/termination-log"}]}}}}
    assert not drifted(desired, live)
    assert drifted(desired, {**live, "spec": {**live["spec"], "replicas": 3}})
    changed = {"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "v", "image": "evil"}]}}}}
    assert drifted(changed, live)
    assert drifted({"spec": {"ports": [1, 2]}}, {"spec": {"ports": [1]}})
    assert drifted({"data": {"a": "1"}}, {})


def test_labels_and_paths():
    assert matches({"a": "1", "b": "2"}, {"a": "1"}) and not matches(None, {"a": "1"})
    assert object_path("Deployment", "ns", "d", "scale") == "/apis/apps/v1/namespaces/ns/deployments/d/scale"
    assert object_path("SpecFleet", "ns") == "/apis/specfleet.io/v1alpha1/namespaces/ns/specfleets"
    with pytest.raises(ValueError, match="unknown kind"):
        object_path("Ingress", "ns")
