"""The Helm chart in deploy/helm/specfleet, checked with real tools: `helm lint --strict` and rendering through
Helm's Go library (helm-python-sdk), every manifest and CRD against the Kubernetes schemas of the oldest and newest
supported version (kubernetes-validate), our own custom resources against our CRDs, values.schema.json rejecting
bad values, and yamllint on the chart's YAML and the rendered output."""

from __future__ import annotations

import copy
import io
import re

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from yamllint import config as yamllint_config
from yamllint import linter

from .chart import (
    CHART_DIR,
    COMBINATIONS,
    EXAMPLES,
    KUBE_VERSIONS,
    YAMLLINT_CONFIG,
    chart_values,
    crd_documents,
    kubernetes_validate_cached,
    lint,
    render,
    template_output,
    validate_custom_resource,
    validate_values,
)

kubernetes_validate_cached()

# Kinds that kubernetes-validate has no schema for; each is checked against a CRD or by named tests instead.
CUSTOM_KINDS = {
    ("specfleet.io/v1alpha1", "SpecFleet"): "our CRD in crds/, checked with jsonschema",
    ("kopf.dev/v1", "KopfPeering"): "kopf's peering CRD in crds/, checked with jsonschema",
    ("kopf.dev/v1", "ClusterKopfPeering"): "kopf's peering CRD in crds/, checked with jsonschema",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "the Prometheus Operator's CRD is not shipped here; "
                                                    "test_service_monitor_scrapes_the_router checks its fields",
    ("cert-manager.io/v1", "Certificate"): "cert-manager's CRD is not shipped here; "
                                           "test_cert_manager_issues_the_internal_certificate checks its fields",
}


@pytest.fixture(scope="module", params=sorted(COMBINATIONS))
def combination(request) -> tuple[str, dict, list[dict]]:
    values = COMBINATIONS[request.param]
    return request.param, values, render(values)


def test_chart_metadata_requires_kubernetes_1_30():
    meta = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["kubeVersion"] == ">=1.30.0-0"
    values = chart_values()
    for component in ("operator", "router", "fusion", "drafter", "verifier", "redis", "models", "auth", "telemetry"):
        assert component in values, f"values.yaml lacks the {component!r} key"
    assert [pool["name"] for pool in values["drafter"]] == ["python", "prose", "c", "general"]


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_helm_lint_strict_is_clean(name):
    report = lint(COMBINATIONS[name] or None)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_crds_are_valid_kubernetes_objects(kube_version):
    crds = crd_documents()
    assert {crd["metadata"]["name"] for crd in crds} >= {
        "specfleets.specfleet.io", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}
    for crd in crds:
        kubernetes_validate.validate(crd, kube_version, strict=True)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_rendered_manifest_validates(combination, kube_version):
    name, _, docs = combination
    assert docs, f"{name}: nothing rendered"
    for doc in docs:
        where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
        reason = CUSTOM_KINDS.get((doc["apiVersion"], doc["kind"]))
        if reason is None:
            try:
                kubernetes_validate.validate(doc, kube_version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {exc.message} at {'.'.join(map(str, exc.path))}")
        elif "CRD in crds/" in reason:
            validate_custom_resource(doc)


def test_the_validators_catch_a_typo():
    # Neither check is vacuous: an unknown field fails the Kubernetes schema and our CRD's schema alike.
    docs = render()
    operator = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
    operator["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(operator, KUBE_VERSIONS[0], strict=True)
    fleet = copy.deepcopy(next(d for d in docs if d["kind"] == "SpecFleet"))
    fleet["spec"]["verifier"]["replica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        validate_custom_resource(fleet)
    fleet["spec"]["verifier"].pop("replica")
    fleet["spec"]["models"]["source"] = "s3"
    with pytest.raises(jsonschema.ValidationError, match="s3"):
        validate_custom_resource(fleet)


def test_every_rendered_object_is_namespaced_in_the_release_namespace(combination):
    name, values, docs = combination
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    for doc in docs:
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in doc["metadata"], f"{name}: {doc['kind']} is cluster-scoped"
        else:
            assert doc["metadata"]["namespace"] == "specfleet-test", f"{name}: {doc['kind']} lacks the namespace"


def _lint_yaml(text: str, where: str) -> None:
    conf = yamllint_config.YamlLintConfig(file=str(YAMLLINT_CONFIG))
    problems = [f"{where}:{p.line}:{p.column} {p.rule}: {p.desc}" for p in linter.run(io.StringIO(text), conf)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", ["values.yaml", "Chart.yaml", "crds/kopf.dev_kopfpeerings.yaml",
                                  "crds/specfleet.io_specfleets.yaml",
                                  *(str(path.relative_to(CHART_DIR)) for path in EXAMPLES.values())])
def test_chart_yaml_files_are_yamllint_clean(path):
    _lint_yaml((CHART_DIR / path).read_text(), path)


def test_rendered_output_is_yamllint_clean(combination):
    name, values, _ = combination
    _lint_yaml(template_output(values), f"helm template ({name})")


# ---- values.schema.json -------------------------------------------------------------------------------------------

def test_schema_accepts_the_defaults_and_every_combination():
    validate_values({})
    for values in COMBINATIONS.values():
        validate_values(values)


BAD_VALUES = {
    "typo at the top": ({"verifer": {"replicas": 2}}, "verifer"),
    "typo in a role": ({"router": {"replica": 2}}, "replica"),
    "typo in a drafter pool": ({"drafter": [{"name": "python", "modle": "drafter-python", "replicas": 1,
                                             "minReplicas": 1, "maxReplicas": 2}]}, "modle"),
    "typo in redis persistence": ({"redis": {"persistence": {"enabeld": False}}}, "enabeld"),
    "wrong type: replicas as a string": ({"verifier": {"replicas": "two"}}, "/verifier/replicas"),
    "wrong type: gpu as a string": ({"drafter": [{"name": "python", "model": "m", "replicas": 1, "minReplicas": 1,
                                                  "maxReplicas": 2, "gpu": "yes"}]}, "/drafter/0/gpu"),
    "wrong type: drafter as a map": ({"drafter": {"python": {}}}, "/drafter"),
    "negative replicas": ({"fusion": {"replicas": -1}}, "/fusion/replicas"),
    "bad enum: redis mode": ({"redis": {"mode": "cluster"}}, "/redis/mode"),
    "bad enum: models source": ({"models": {"source": "s3"}}, "/models/source"),
    "bad enum: pull policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "pvc without a claim": ({"models": {"source": "pvc"}}, "/models/claimName"),
    "relative models path": ({"models": {"path": "models"}}, "/models/path"),
    "pool name not a DNS label": ({"drafter": [{"name": "Python_1", "model": "m", "replicas": 1, "minReplicas": 1,
                                                "maxReplicas": 2}]}, "/drafter/0/name"),
    "bad redis url": ({"redis": {"mode": "external", "external": {"url": "http://redis:6379"}}},
                      "/redis/external/url"),
    "root allowed": ({"securityContext": {"runAsNonRoot": False}}, "/securityContext/runAsNonRoot"),
    "writable root filesystem": ({"securityContext": {"readOnlyRootFilesystem": False}},
                                 "/securityContext/readOnlyRootFilesystem"),
    "bad resource quantity": ({"router": {"resources": {"limits": {"memory": "lots"}}}}, "/router/resources"),
    "typo in tls": ({"tls": {"internal": {"enable": True}}}, "enable"),
    "bad certificate duration": ({"tls": {"internal": {"certManager": {"duration": "90 days"}}}},
                                 "/tls/internal/certManager/duration"),
    "absolute target path": ({"models": {"target": "/models/llama"}},
                             "/models/target"),
    "drafter path climbing out": ({"models": {"drafters": [{"name": "one-b", "path": "../llama"}]}},
                                  "/models/drafters/0/path"),
    "drafter named like a model-free pool": ({"models": {"drafters": [{"name": "suffix", "path": "x"}]}},
                                             "/models/drafters/0/name"),
    "typo in a drafter model": ({"models": {"drafters": [{"name": "one-b", "pth": "x"}]}}, "pth"),
    "bad enum: dtype": ({"models": {"dtype": "fp8"}}, "/models/dtype"),
    "KV memory in petabytes": ({"models": {"kvCacheMemory": "4PiB"}}, "/models/kvCacheMemory"),
    "absolute head path": ({"models": {"head": "/models/head"}}, "/models/head"),
    "drafter named like the head pool": ({"models": {"drafters": [{"name": "head", "path": "x"}]}},
                                         "/models/drafters/0/name"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(case):
    values, expected_in_message = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError) as caught:
        validate_values(values)
    assert expected_in_message in str(caught.value)
    # An install applies the same schema: rendering refuses the values too.
    with pytest.raises(helm.HelmError):
        render(values)


RENDER_FAILURES = {
    "external redis without a url": ({"redis": {"mode": "external"}}, "redis.external.url"),
    "min above max": ({"verifier": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas (5) must be <= maxReplicas"),
    "duplicate pool": ({"drafter": [{"name": "c", "model": "drafter-c", "replicas": 1, "minReplicas": 1,
                                     "maxReplicas": 2}] * 2}, 'pool name "c" appears twice'),
    "mtls without a certificate": ({"tls": {"internal": {"enabled": True}}}, "tls.internal.existingSecret"),
    "mtls with cert-manager but no issuer": ({"tls": {"internal": {"enabled": True, "certManager": {"enabled": True}}}},
                                             "certManager.issuerRef.name"),
    # the default pools (python, prose, ...) name no declared drafter
    "pool naming an undeclared drafter": ({"models": {"drafters": [{"name": "one-b", "path": "llama-3.2-1b"}]}},
                                          'pool "python" names no drafter of models.drafters (one-b)'),
    "pool with a bundled model folder": ({"models": {"drafters": [{"name": "one-b", "path": "llama-3.2-1b"}]},
                                          "drafter": [{"name": "one-b", "model": "drafter-one-b", "replicas": 1,
                                                       "minReplicas": 1, "maxReplicas": 2}]},
                                         'pool "one-b" sets model "drafter-one-b"'),
    "duplicate drafter names": ({"models": {"drafters": [{"name": "one-b", "path": "a"}, {"name": "one-b",
                                                                                           "path": "b"}]}},
                                'drafter name "one-b" appears twice'),
    "head pool without a head": ({"drafter": [{"name": "head", "replicas": 1, "minReplicas": 1, "maxReplicas": 2}]},
                                 'pool "head" serves the draft head, but models.head is not set'),
    "head pool with a model": ({"models": {"head": "head"},
                                "drafter": [{"name": "head", "model": "head", "replicas": 1, "minReplicas": 1,
                                             "maxReplicas": 2}]},
                               'pool "head" sets model "head"; it serves models.head (head): remove model'),
}


@pytest.mark.parametrize("case", sorted(RENDER_FAILURES))
def test_render_fails_with_a_message_that_says_what_to_fix(case):
    values, expected = RENDER_FAILURES[case]
    with pytest.raises(helm.HelmRenderError, match=re.escape(expected)):
        render(values)


@pytest.mark.parametrize("release", ["1fleet", "a" * 60])
def test_release_names_that_cannot_name_the_fleet_are_refused(release):
    with pytest.raises(helm.HelmError, match="release name"):
        render({}, release=release)
