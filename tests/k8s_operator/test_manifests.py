"""Manifests for a SpecFleet: every object validates against the Kubernetes 1.30 schemas (strict), for GPU on and
off, models from the image or a PVC, in-cluster and external Redis; and each follows docs/kubernetes.md."""

from __future__ import annotations

import base64

import kubernetes_validate
import pytest

from specfleet_operator.manifests import (
    config_hash,
    fleet_manifests,
    internal_token_secret,
    object_name,
    redis_url_secret,
    verifier_selector,
)
from specfleet_operator.spec import FleetSpec, SpecError

POOLS = [{"name": "python", "model": "drafter-python"}, {"name": "suffix", "model": "", "gpu": False}]
VARIANTS = {
    "defaults": {},
    "gpu-off-image": {"verifier": {"gpu": False}, "drafters": [{"name": "python", "gpu": False}]},
    "pvc-external-redis-auth": {
        "models": {"source": "pvc", "claimName": "models", "path": "/data/models"},
        "redis": {"mode": "external", "url": "rediss://:pw@redis.example:6380/1"},
        "auth": {"tokenSecretRef": {"name": "public-token"}}, "telemetry": {"otlpEndpoint": "http://otel:4317"},
        "drafters": POOLS,
    },
    "external-secret-scheduling": {
        "redis": {"mode": "external", "secretRef": {"name": "my-redis", "key": "uri"}},
        "verifier": {"resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}},
                     "nodeSelector": {"gpu": "h100"},
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                     "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                         {"weight": 50, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                            "labelSelector": {"matchLabels": {
                                                                "app.kubernetes.io/component": "verifier"}}}}]}}},
    },
    "internal-mtls": {"tls": {"internal": {"secretName": "demo-internal-tls"}}, "drafters": POOLS},
}


def by_kind(objects, kind):
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_manifest_validates_strictly(variant):
    spec = FleetSpec.from_dict("demo", VARIANTS[variant])
    objects = fleet_manifests(spec, {"verifier": 3})
    objects.append(internal_token_secret(spec, "x" * 32))
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30", strict=True)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for role in spec.roles:
        for kind in ("Deployment", "Service", "ConfigMap"):
            assert (kind, object_name("demo", role.key)) in names
    assert by_kind(objects, "Deployment")["demo-verifier"]["spec"]["replicas"] == 3


def test_labels_ports_and_commands_follow_the_contract():
    spec = FleetSpec.from_dict("demo", {"drafters": POOLS})
    objects = fleet_manifests(spec)
    deployments, services = by_kind(objects, "Deployment"), by_kind(objects, "Service")
    assert set(deployments) == {"demo-router", "demo-fusion", "demo-verifier", "demo-drafter-python",
                                "demo-drafter-suffix"}
    pod = deployments["demo-drafter-python"]["spec"]["template"]
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/name": "specfleet", "app.kubernetes.io/instance": "demo",
        "app.kubernetes.io/component": "drafter", "app.kubernetes.io/managed-by": "specfleet-operator",
        "specfleet.io/fleet": "demo", "specfleet.io/pool": "python"}
    router = deployments["demo-router"]["spec"]["template"]["spec"]["containers"][0]
    assert router["command"] == ["specfleet"]
    assert router["args"] == [
        "serve", "router", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000", "--models", "/models",
        "--drafters", "python=demo-drafter-python:50051,suffix=demo-drafter-suffix:50051",
        "--verifiers", "demo-verifier:50051", "--fusion", "demo-fusion:50051"]
    assert [(p["name"], p["containerPort"]) for p in router["ports"]] == [("grpc", 50051), ("http", 8000)]
    drafter = pod["spec"]["containers"][0]
    # the CRD's default: model pods (verifier, drafter pools) request a GPU and run their models on it
    assert drafter["args"] == ["serve", "drafter", "--host", "0.0.0.0", "--port", "50051", "--models", "/models",
                               "--pool", "python", "--device", "cuda"]
    fusion = deployments["demo-fusion"]["spec"]["template"]["spec"]["containers"][0]
    assert fusion["args"] == ["serve", "fusion", "--host", "0.0.0.0", "--port", "50051"]
    verifier = deployments["demo-verifier"]["spec"]["template"]["spec"]["containers"][0]
    assert verifier["args"] == ["serve", "verifier", "--host", "0.0.0.0", "--port", "50051", "--models", "/models",
                                "--device", "cuda"]
    for container in (router, drafter, fusion, verifier):
        assert container["readinessProbe"]["grpc"] == {"port": 50051}
        assert container["livenessProbe"]["grpc"] == {"port": 50051}
    assert services["demo-router"]["spec"].get("clusterIP") is None  # ClusterIP with a virtual IP
    assert [p["name"] for p in services["demo-router"]["spec"]["ports"]] == ["grpc", "http"]
    for name in ("demo-verifier", "demo-fusion", "demo-drafter-python"):
        assert services[name]["spec"]["clusterIP"] == "None"  # headless: dns:/// round robin over pods
    assert verifier_selector("demo") == ("app.kubernetes.io/component=verifier,app.kubernetes.io/instance=demo,"
                                         "app.kubernetes.io/name=specfleet")


def test_internal_mtls_mounts_the_secret_and_probes_a_health_only_port():
    spec = FleetSpec.from_dict("demo", VARIANTS["internal-mtls"])
    assert spec.internal_tls and spec.internal_server_name == "demo-internal"
    deployments = by_kind(fleet_manifests(spec), "Deployment")
    tls = "/etc/specfleet/tls"
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert {"name": "internal-tls", "secret": {"secretName": "demo-internal-tls", "defaultMode": 0o440}} in \
            pod["volumes"], name
        assert {"name": "internal-tls", "mountPath": tls, "readOnly": True} in container["volumeMounts"], name
        args = container["args"]
        if name == "demo-router":  # presents the certificate as its client one, checks the internal name
            assert args[-8:] == ["--internal-tls-ca", f"{tls}/ca.crt", "--internal-tls-cert", f"{tls}/tls.crt",
                                 "--internal-tls-key", f"{tls}/tls.key", "--internal-tls-server-name",
                                 "demo-internal"]
            assert container["readinessProbe"]["grpc"] == {"port": 50051}
            continue
        assert args[-8:] == ["--tls-cert", f"{tls}/tls.crt", "--tls-key", f"{tls}/tls.key", "--tls-client-ca",
                             f"{tls}/ca.crt", "--health-port", "50052"], name
        assert ("health", 50052) in [(p["name"], p["containerPort"]) for p in container["ports"]], name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # kubelet can't present a client cert
            assert container[probe]["grpc"] == {"port": 50052}, (name, probe)
    named = FleetSpec.from_dict("demo", {"tls": {"internal": {"secretName": "s", "serverName": "x.internal"}}})
    router = by_kind(fleet_manifests(named), "Deployment")["demo-router"]["spec"]["template"]["spec"]["containers"][0]
    assert router["args"][-1] == "x.internal"
    plain = by_kind(fleet_manifests(FleetSpec.from_dict("demo", {})), "Deployment")
    for dep in plain.values():
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert not any(a.startswith(("--tls", "--internal-tls", "--health-port")) for a in container["args"])


def test_security_context_tmp_and_gpu():
    spec = FleetSpec.from_dict("demo", {"drafters": POOLS})
    deployments = by_kind(fleet_manifests(spec), "Deployment")
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        container = pod["containers"][0]
        security = container["securityContext"]
        assert security["runAsNonRoot"] and security["runAsUser"] == 10001 and security["readOnlyRootFilesystem"]
        assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        expects_gpu = name in ("demo-verifier", "demo-drafter-python")
        assert gpus == (1 if expects_gpu else None), name
        rollout = dep["spec"]["strategy"]["rollingUpdate"]
        assert rollout == ({"maxUnavailable": 1, "maxSurge": 0} if expects_gpu else {"maxUnavailable": 0,
                                                                                      "maxSurge": 1})


def _secret_files(pod: dict) -> dict[str, tuple[str, str]]:
    """File under /etc/specfleet/secrets -> (Secret, key), from the pod's projected `secrets` volume."""
    volume = next(v for v in pod["volumes"] if v["name"] == "secrets")
    assert volume["projected"]["defaultMode"] == 0o440
    return {item["path"]: (source["secret"]["name"], item["key"])
            for source in volume["projected"]["sources"] for item in source["secret"]["items"]}


def test_secrets_are_mounted_files_and_settings_come_from_the_config_map():
    spec = FleetSpec.from_dict("demo", VARIANTS["pvc-external-redis-auth"])
    objects = fleet_manifests(spec)
    deployments = by_kind(objects, "Deployment")
    router_pod = deployments["demo-router"]["spec"]["template"]["spec"]
    router = router_pod["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in router["env"]}
    assert env["SPECFLEET_REDIS_URL_FILE"] == "/etc/specfleet/secrets/redis-url"
    assert env["SPECFLEET_TOKEN_FILE"] == "/etc/specfleet/secrets/token"
    assert env["SPECFLEET_INTERNAL_TOKEN_FILE"] == "/etc/specfleet/secrets/internal-token"
    assert env["SPECFLEET_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert _secret_files(router_pod) == {"redis-url": ("demo-redis", "url"), "token": ("public-token", "token"),
                                         "internal-token": ("demo-internal-token", "token")}
    assert {"name": "secrets", "mountPath": "/etc/specfleet/secrets", "readOnly": True} in router["volumeMounts"]
    verifier = deployments["demo-verifier"]["spec"]["template"]["spec"]
    venv = {e["name"]: e.get("value") for e in verifier["containers"][0]["env"]}
    assert venv["SPECFLEET_TOKEN_FILE"] == "/etc/specfleet/secrets/token"
    assert _secret_files(verifier) == {"redis-url": ("demo-redis", "url"), "token": ("demo-internal-token", "token")}
    assert "SPECFLEET_INTERNAL_TOKEN_FILE" not in venv
    for dep in deployments.values():  # no Secret reaches a pod through its environment
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in container["env"])
        assert not any("secretRef" in e for e in container["envFrom"])
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in verifier["volumes"]
    mounts = verifier["containers"][0]["volumeMounts"]
    assert {"name": "models", "mountPath": "/data/models", "readOnly": True} in mounts
    assert "--models" in verifier["containers"][0]["args"] and "/data/models" in verifier["containers"][0]["args"]
    fusion = deployments["demo-fusion"]["spec"]["template"]["spec"]
    assert [v["name"] for v in fusion["volumes"]] == ["tmp", "secrets"]  # fusion never reads the models
    secret = by_kind(objects, "Secret")["demo-redis"]
    assert base64.b64decode(secret["data"]["url"]).decode() == "rediss://:pw@redis.example:6380/1"
    maps = by_kind(objects, "ConfigMap")
    assert maps["demo-drafter-python"]["data"]["SPECFLEET_POOL"] == "python"
    assert maps["demo-verifier"]["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel:4317"
    assert maps["demo-verifier"]["data"]["SPECFLEET_ROLE"] == "verifier"
    for text in (str(o) for o in objects if o["kind"] != "Secret"):
        assert "pw@" not in text  # the Redis password is only ever in the Secret


def test_secret_rules_and_config_hash():
    plain = FleetSpec.from_dict("demo", {})
    assert redis_url_secret(plain) is None  # in-cluster: the chart's <fleet>-redis Secret
    named = FleetSpec.from_dict("demo", VARIANTS["external-secret-scheduling"])
    assert redis_url_secret(named) is None
    pod = by_kind(fleet_manifests(named), "Deployment")["demo-verifier"]["spec"]["template"]["spec"]
    assert _secret_files(pod)["redis-url"] == ("my-redis", "uri")
    with pytest.raises(ValueError, match="at least 16"):
        internal_token_secret(plain, "short")
    traced = FleetSpec.from_dict("demo", {"telemetry": {"otlpEndpoint": "http://otel:4317"}})
    assert config_hash(plain, plain.role("router")) != config_hash(traced, traced.role("router"))


def test_names_too_long_for_a_service_are_refused():
    spec = FleetSpec.from_dict("a-very-long-fleet-name-for-testing", {"drafters": [{"name": "p" * 40}]})
    with pytest.raises(SpecError, match="shorten the SpecFleet name"):
        fleet_manifests(spec)


def test_image_by_digest_and_policy_skips():
    tagged = by_kind(fleet_manifests(FleetSpec.from_dict("demo", {})), "Deployment")["demo-router"]
    assert tagged["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/specfleet/specfleet:0.1.0"
    skips = tagged["metadata"]["annotations"]
    assert set(skips) == {"checkov.io/skip-CKV_K8S_43", "checkov.io/skip-CKV_K8S_15"}
    for key, value in skips.items():  # checkov reads CHECK=reason and splits on the one `=`
        check, reason = value.split("=")
        assert key.endswith(check) and reason
    digest = "sha256:" + "ab" * 32
    pinned = FleetSpec.from_dict("demo", {"image": {"digest": digest, "pullPolicy": "Always"}})
    router = by_kind(fleet_manifests(pinned), "Deployment")["demo-router"]
    assert router["spec"]["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/specfleet/specfleet@{digest}"
    assert "annotations" not in router["metadata"]  # nothing left to skip (and no empty dict to drift on)
    with pytest.raises(SpecError, match="sha256"):
        FleetSpec.from_dict("demo", {"image": {"digest": "latest"}})
