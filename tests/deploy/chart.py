"""Renders the specfleet Helm chart with real Helm (helm-python-sdk) and hands the tests parsed manifests, pod specs
and the CRDs' schemas. Shared by the chart tests in this folder."""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "specfleet"
YAMLLINT_CONFIG = REPO_ROOT / ".yamllint.yaml"
RELEASE = "specfleet"
NAMESPACE = "specfleet-test"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ("1.30", "1.37")
POD_KINDS = {"Pod": (), "Deployment": ("template",), "StatefulSet": ("template",)}

# The value combinations a platform team is expected to install; every test below runs on each.
COMBINATIONS: dict[str, dict] = {
    "defaults": {},
    "gpu": {
        "image": {"tag": "0.1.0-cuda"},
        "verifier": {"gpu": True, "resources": {"limits": {"memory": "16Gi"}},
                     "nodeSelector": {"nvidia.com/gpu.present": "true"},
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "drafter": [{"name": "python", "model": "drafter-python", "replicas": 2, "minReplicas": 1, "maxReplicas": 4,
                     "gpu": True, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                     "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                         "nodeSelectorTerms": [{"matchExpressions": [
                             {"key": "nvidia.com/gpu.product", "operator": "Exists"}]}]}}}},
                    {"name": "suffix", "model": "", "replicas": 1, "minReplicas": 1, "maxReplicas": 2}],
    },
    "external-redis-url": {"redis": {"mode": "external", "external": {"url": "rediss://:pw@redis.example:6380/2"}}},
    "external-redis-secret": {"redis": {"mode": "external",
                                        "external": {"existingSecret": {"name": "my-redis", "key": "redis-url"}}}},
    "auth-off": {"auth": {"enabled": False}},
    "auth-existing-secret": {"auth": {"existingSecret": {"name": "my-token", "key": "bearer"}}},
    "monitoring-restricted-router": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "networkPolicy": {"routerFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress"}}}]},
    },
    "bare": {"networkPolicy": {"enabled": False}, "podDisruptionBudget": {"enabled": False},
             "imagePullSecrets": [{"name": "registry-credentials"}],
             "operator": {"nodeSelector": {"kubernetes.io/os": "linux"},
                          "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "specfleet"}]},
             "redis": {"persistence": {"enabled": False},
                       "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                           {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}}}},
    "all-namespaces": {"operator": {"watchAllNamespaces": True}},
    "mtls-cert-manager": {"tls": {"internal": {"enabled": True, "certManager": {
        "enabled": True, "issuerRef": {"name": "internal-ca", "kind": "ClusterIssuer"}}}}},
    "mtls-existing-secret": {"tls": {"internal": {"enabled": True, "existingSecret": "my-internal-tls",
                                                  "serverName": "specfleet.internal"}}},
    "models-pvc": {"models": {"source": "pvc", "claimName": "specfleet-models"},
                   "autoscaling": {"enabled": False}, "telemetry": {"otlpEndpoint": "http://otel:4317"}},
}
# The example values files under examples/ (`helm install -f`), each one more combination.
EXAMPLES = {f"example-{path.stem}": path for path in sorted((CHART_DIR / "examples").glob("*.yaml"))}
COMBINATIONS.update({name: yaml.safe_load(path.read_text()) for name, path in EXAMPLES.items()})


def kubernetes_validate_cached() -> None:
    """kubernetes-validate re-reads and re-parses its schema files (a 1 MB definitions file among them) on every
    call; keeping the parsed files makes validating hundreds of manifests take seconds. Validation is unchanged."""
    from kubernetes_validate import utils

    if not hasattr(utils.schema_contents, "cache_info"):
        utils.schema_contents = functools.cache(utils.schema_contents)


@functools.cache
def _chart() -> helm.Chart:
    # One native handle for the whole session: loading parses every template.
    return helm.Chart.load(CHART_DIR)


def render_files(values: dict[str, Any] | None = None, release: str = RELEASE) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would print them (NOTES.txt included)."""
    return _chart().render(copy.deepcopy(values or {}), name=release, namespace=NAMESPACE, is_install=True)


def template_output(values: dict[str, Any] | None = None) -> str:
    """The manifests as `helm template` prints them: each document split out of its file the way Helm splits
    manifests (separator lines, surrounding whitespace trimmed, empty documents dropped), headed by its source."""
    out = []
    for path, text in sorted(render_files(values).items()):
        if path.endswith(".txt"):
            continue
        for doc in re.split(r"(?:^|\s*\n)---\s*", text):
            if doc.strip():
                out.append(f"---\n# Source: {path}\n{doc.strip()}\n")
    return "".join(out)


def render(values: dict[str, Any] | None = None, release: str = RELEASE) -> list[dict[str, Any]]:
    """Every manifest the chart renders for these values (templates only; CRDs are in crd_documents())."""
    docs = []
    for path, text in sorted(render_files(values, release).items()):
        if path.endswith(".txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def validate_values(values: dict[str, Any]) -> None:
    """Raises helm_python.HelmValuesError when values.schema.json rejects the values."""
    _chart().validate_schema(copy.deepcopy(values))


def chart_values() -> dict[str, Any]:
    return _chart().values


def lint(values: dict[str, Any] | None = None, kube_version: str = "v1.30.0") -> dict[str, Any]:
    return helm.lint(CHART_DIR, copy.deepcopy(values) if values else None, strict=True, namespace=NAMESPACE,
                     kube_version=kube_version)


@functools.cache
def crd_documents() -> tuple[dict[str, Any], ...]:
    """The CustomResourceDefinitions under crds/, as Helm loads them."""
    docs = []
    for crd in _chart().crds:
        docs.extend(doc for doc in yaml.safe_load_all(crd["data"]) if doc)
    return tuple(docs)


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema with unknown fields rejected, as the API server does under strict field validation:
    objects with declared properties and no x-kubernetes-preserve-unknown-fields accept nothing else."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {key: _strict(sub) for key, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _strict(schema[key])
    return schema


def validate_custom_resource(obj: dict[str, Any]) -> None:
    """Validates a custom resource of a kind the chart's crds/ define against that CRD's openAPIV3Schema.
    Raises LookupError for a kind no CRD in crds/ defines, jsonschema.ValidationError when it does not fit."""
    group, _, version = obj["apiVersion"].rpartition("/")
    for crd in crd_documents():
        if crd["spec"]["group"] != group or crd["spec"]["names"]["kind"] != obj["kind"]:
            continue
        for served in crd["spec"]["versions"]:
            if served["name"] == version:
                schema = _strict(served["schema"]["openAPIV3Schema"])
                # apiVersion, kind and metadata are the API server's, whatever the CRD declares: metadata only
                # needs to be an object with a name here (kubernetes-validate checks no ObjectMeta of a CR).
                schema["properties"] = {**schema["properties"], "apiVersion": {"type": "string"},
                                        "kind": {"type": "string"},
                                        "metadata": {"type": "object", "required": ["name"]}}
                # CRD schemas are OpenAPI v3.0: draft 4's boolean exclusiveMinimum, no $schema.
                jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker()).validate(obj)
                return
    raise LookupError(f"no CRD in {CHART_DIR / 'crds'} defines {obj['apiVersion']} {obj['kind']}")


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(object name, pod metadata, pod spec) of every pod the manifests would create."""
    for doc in docs:
        if doc["kind"] not in POD_KINDS:
            continue
        pod = doc["spec"]
        for key in POD_KINDS[doc["kind"]]:
            pod = pod[key]
        yield f"{doc['kind']}/{doc['metadata']['name']}", pod.get("metadata", doc["metadata"]), pod.get("spec", pod)


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def secret_files(pod_spec: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """File path in the container -> (Secret, key) for each Secret key mounted into it (secret and projected volumes;
    a whole Secret mounted without items shows as `<mountPath>/*` with key `*`)."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})  # none: a StatefulSet's volumeClaimTemplates
        sources = [volume["secret"] | {"name": volume["secret"]["secretName"]}] if "secret" in volume else [
            src["secret"] for src in volume.get("projected", {}).get("sources", []) if "secret" in src]
        for source in sources:
            for item in source.get("items") or [{"key": "*", "path": "*"}]:
                files[f"{mount['mountPath']}/{item['path']}"] = (source["name"], item["key"])
    return files


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
