"""The SpecFleet CRD: a structural apiextensions/v1 schema whose defaults, enums, CEL rules and scale subresource
are what the operator and chart expect; sample resources validate and a typo is rejected."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from .crd_schema import FORBIDDEN_KEYWORDS, apply_defaults, load_crd, validation_errors, walk


@pytest.fixture(scope="module")
def crd() -> dict:
    return load_crd()


@pytest.fixture(scope="module")
def schema(crd) -> dict:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def sample(spec: dict | None = None) -> dict:
    return {"apiVersion": "specfleet.io/v1alpha1", "kind": "SpecFleet", "metadata": {"name": "demo"},
            "spec": spec or {}}


def test_crd_is_a_valid_apiextensions_v1_object(crd):
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "specfleets.specfleet.io"
    kubernetes_validate.validate(crd, "1.30", strict=True)
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("SpecFleet", "specfleets", ["sf"])
    assert crd["spec"]["scope"] == "Namespaced" and crd["spec"]["group"] == "specfleet.io"


def test_schema_is_structural(schema):
    for path, node in walk(schema):
        assert node.get("type"), f"{path or '<root>'} has no type"
        assert not FORBIDDEN_KEYWORDS & set(node), f"{path}: keyword not allowed in a structural schema"
        assert not ("properties" in node and "additionalProperties" in node), f"{path}: properties and " \
            "additionalProperties are mutually exclusive"
        if node.get("x-kubernetes-list-type") == "map":
            items = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in items.get("required", []) or "default" in items["properties"][key], path
        if "default" in node:  # a default must survive pruning and validate against its own node
            assert validation_errors(node, copy.deepcopy(node["default"])) == [], path


def test_scale_and_status_subresources(crd):
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.verifier.replicas",
                                                 "statusReplicasPath": ".status.replicas",
                                                 "labelSelectorPath": ".status.selector"}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Ready": ".status.ready", "Verifiers": ".status.roles.verifier.ready",
                       "Drafters": ".status.drafterReplicas", "QueueWait": ".status.queueWaitMs",
                       "Acceptance": ".status.acceptance", "Age": ".metadata.creationTimestamp"}


def test_empty_spec_gets_every_default(schema):
    stored = apply_defaults(schema, sample())
    spec = stored["spec"]
    assert validation_errors(schema, sample()) == []
    assert spec["image"] == {"repository": "ghcr.io/specfleet/specfleet", "tag": "0.1.0", "pullPolicy": "IfNotPresent"}
    assert spec["models"] == {"source": "image", "path": "/models", "claimName": ""}
    assert (spec["router"]["replicas"], spec["router"]["maxReplicas"], spec["router"]["gpu"]) == (1, 4, False)
    assert (spec["verifier"]["maxReplicas"], spec["verifier"]["gpu"]) == (8, True)
    assert [(p["name"], p["model"], p["gpu"]) for p in spec["drafters"]] == [("python", "drafter-python", True)]
    autoscaling = spec["autoscaling"]
    assert autoscaling["targets"] == {"queueWaitMs": 50, "gpuUtilizationPercent": 90, "drafterVerifierBalance": 1.0}
    assert autoscaling["stabilizationWindowSeconds"] == {"up": 15, "down": 210}
    assert (autoscaling["k"], autoscaling["maxStep"], autoscaling["cooldownSeconds"],
            autoscaling["scaleDownCooldownSeconds"]) == (4, 2, 45, 120)
    assert spec["redis"] == {"mode": "inCluster", "url": "", "secretRef": {"name": "", "key": "url"}}
    assert spec["auth"] == {"tokenSecretRef": {"name": "", "key": "token"}}


FULL_SPEC = {
    "image": {"repository": "registry.local/specfleet", "tag": "dev", "pullPolicy": "Always"},
    "models": {"source": "pvc", "path": "/models", "claimName": "specfleet-models"},
    "router": {"replicas": 2, "minReplicas": 2, "maxReplicas": 6, "resources": {"requests": {"cpu": "500m"}},
               "nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "dedicated", "operator": "Exists"}]},
    "drafters": [{"name": "python", "model": "drafter-python", "maxReplicas": 4},
                 {"name": "suffix", "gpu": False, "affinity": {"nodeAffinity": {"anything": ["goes"]}}}],
    "verifier": {"replicas": 3, "minReplicas": 1, "maxReplicas": 8, "resources": {"limits": {"nvidia.com/gpu": 1}}},
    "autoscaling": {"speculationParallelism": True, "k": 6, "targets": {"queueWaitMs": 20.5},
                    "stabilizationWindowSeconds": {"up": 0, "down": 120}, "maxStep": 1, "cooldownSeconds": 0},
    "redis": {"mode": "external", "secretRef": {"name": "redis-url", "key": "url"}},
    "auth": {"tokenSecretRef": {"name": "specfleet-token"}},
    "telemetry": {"otlpEndpoint": "http://otel-collector:4317"},
}


def test_full_sample_validates(schema):
    assert validation_errors(schema, sample(FULL_SPEC)) == []


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"verifer": {"replicas": 2}}, "Additional properties"),  # typo at the top of spec
        ({"router": {"replica": 2}}, "Additional properties"),  # typo inside a role
        ({"autoscaling": {"targets": {"queueWait": 10}}}, "Additional properties"),
        ({"drafters": [{"name": "python", "modle": "x"}]}, "Additional properties"),
        ({"redis": {"mode": "cluster"}}, "is not one of"),
        ({"models": {"source": "s3"}}, "is not one of"),
        ({"verifier": {"replicas": -1}}, "less than the minimum"),
        ({"drafters": [{"name": "Python!"}]}, "does not match"),
        ({"drafters": [{"model": "drafter-python"}]}, "'name' is a required property"),
        ({"drafters": []}, "should be non-empty"),
        ({"verifier": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas must be <= maxReplicas"),
        ({"drafters": [{"name": "c", "minReplicas": 9}]}, "minReplicas must be <= maxReplicas"),
        ({"models": {"source": "pvc"}}, "models.source pvc needs models.claimName"),
        ({"redis": {"mode": "external"}}, "redis.mode external needs redis.url or redis.secretRef.name"),
        ({"autoscaling": {"targets": {"gpuUtilizationPercent": 120}}}, "greater than the maximum"),
    ],
)
def test_bad_resources_are_rejected(schema, spec, expected):
    errors = validation_errors(schema, sample(spec))
    assert any(expected in e for e in errors), errors


def test_preserved_fields_accept_anything(schema):
    spec = {"verifier": {"resources": {"limits": {"nvidia.com/gpu": 2}, "claims": [{"name": "x"}]},
                         "affinity": {"podAntiAffinity": {"whatever": True}},
                         "tolerations": [{"key": "nvidia.com/gpu", "effect": "NoSchedule", "extra": 1}]}}
    assert validation_errors(schema, sample(spec)) == []


def test_status_shape_validates(schema):
    resource = sample()
    resource["status"] = {
        "observedGeneration": 3, "replicas": 2, "selector": "specfleet.io/fleet=demo", "ready": "5/6",
        "drafterReplicas": 2, "roles": {"verifier": {"desired": 3, "ready": 2}, "drafter-python": {"desired": 2,
                                                                                                  "ready": 2}},
        "queueWaitMs": 12.5, "acceptance": 2.7,
        "conditions": [{"type": "Ready", "status": "False", "reason": "RolloutInProgress", "message": "5/6 ready",
                        "lastTransitionTime": "2026-12-01T00:00:00Z"}],
        "decisions": [{"time": "2026-12-01T00:00:00Z", "role": "verifier", "from": 2, "to": 3,
                       "reason": "queue wait 80 ms > target 50 ms", "metrics": {"queue_wait_ms": 80.0}}],
    }
    assert validation_errors(schema, resource) == []
