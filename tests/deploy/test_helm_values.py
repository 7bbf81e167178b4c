"""What the chart's values do to the rendered manifests: pod security on every pod, the SpecFleet resource built from
the role values (GPU on and off), in-cluster versus external Redis, auth on and off, NetworkPolicies, PDBs, the
operator's least-privilege RBAC, the ServiceMonitor and the `helm test` pod. Names and labels follow
docs/kubernetes.md, the contract with the operator."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from redis.connection import parse_url

from .chart import (
    COMBINATIONS,
    chart_values,
    containers,
    env_of,
    find,
    one,
    pod_specs,
    render,
    render_files,
    secret_files,
)

FLEET = "specfleet"  # the release name the tests install under names the fleet
CONTRACT_POD_LABELS = {"app.kubernetes.io/name": "specfleet", "app.kubernetes.io/instance": FLEET}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(values) for name, values in COMBINATIONS.items()}


def test_every_pod_runs_non_root_read_only_without_capabilities(rendered):
    for name, docs in rendered.items():
        pods = list(pod_specs(docs))
        assert {where for where, _, _ in pods} >= {"Deployment/specfleet-operator", "Pod/specfleet-test"}
        for where, _, spec in pods:
            at = f"{name}: {where}"
            assert spec["securityContext"]["runAsNonRoot"] is True, at
            assert spec["securityContext"]["runAsUser"] != 0, at
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, at
            for key in ("hostNetwork", "hostPID", "hostIPC"):
                assert not spec.get(key), f"{at}: {key}"
            assert not [v for v in spec.get("volumes", []) if "hostPath" in v], f"{at}: hostPath volume"
            for container in containers(spec):
                ctx = container["securityContext"]
                cat = f"{at} container {container['name']}"
                assert ctx["runAsNonRoot"] is True and ctx.get("runAsUser", 1) != 0, cat
                assert ctx["readOnlyRootFilesystem"] is True, cat
                assert ctx["allowPrivilegeEscalation"] is False, cat
                assert ctx["capabilities"]["drop"] == ["ALL"] and not ctx["capabilities"].get("add"), cat
                assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, cat
                assert not ctx.get("privileged"), cat
                assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], cat
                # The root filesystem is read-only: scratch space is an emptyDir at /tmp.
                assert "/tmp" in {m["mountPath"] for m in container.get("volumeMounts", [])}, cat


def test_spec_fleet_resource_carries_the_role_values(rendered):
    fleet = one(rendered["defaults"], "SpecFleet")
    values = chart_values()
    assert fleet["metadata"]["name"] == FLEET
    spec = fleet["spec"]
    assert spec["image"] == {"repository": values["image"]["repository"], "tag": "0.1.0", "pullPolicy": "IfNotPresent"}
    for role in ("router", "fusion", "verifier"):
        assert spec[role] == values[role]
    assert spec["drafters"] == values["drafter"]
    assert [pool["name"] for pool in spec["drafters"]] == ["python", "prose", "c", "general"]
    assert spec["models"] == {"source": "image", "path": "/models", "claimName": ""}
    assert spec["autoscaling"] == values["autoscaling"]
    assert spec["telemetry"] == {"otlpEndpoint": ""}
    # CPU by default: no pod asks for a GPU unless the values say so.
    assert not any(role["gpu"] for role in [spec["router"], spec["fusion"], spec["verifier"], *spec["drafters"]])


def test_gpu_values_reach_the_spec_fleet_resource(rendered):
    spec = one(rendered["gpu"], "SpecFleet")["spec"]
    gpu = COMBINATIONS["gpu"]
    assert spec["image"]["tag"] == "0.1.0-cuda"
    assert spec["verifier"]["gpu"] is True
    assert spec["verifier"]["tolerations"] == gpu["verifier"]["tolerations"]
    assert spec["verifier"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # Helm merges maps: the verifier keeps the default requests and CPU limit and gets the new memory limit.
    assert spec["verifier"]["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}
    assert spec["verifier"]["resources"]["requests"] == chart_values()["verifier"]["resources"]["requests"]
    # Lists replace: exactly the given pools.
    python, suffix = spec["drafters"]
    assert python["gpu"] is True and python["affinity"] == gpu["drafter"][0]["affinity"]
    assert suffix == {"name": "suffix", "model": "", "replicas": 1, "minReplicas": 1, "maxReplicas": 2}
    assert spec["router"]["gpu"] is False and spec["fusion"]["gpu"] is False


def test_models_from_a_pvc(rendered):
    spec = one(rendered["models-pvc"], "SpecFleet")["spec"]
    assert spec["models"] == {"source": "pvc", "path": "/models", "claimName": "specfleet-models"}
    assert spec["autoscaling"]["enabled"] is False
    assert spec["telemetry"]["otlpEndpoint"] == "http://otel:4317"


def test_the_gpu_example_serves_its_models_by_path(rendered):
    # examples/llama-3.1-8b-gpu.yaml: the models fields reach the SpecFleet as given, and the operator turns them
    # into each role's --target / --drafter and the dtype, device and KV options on pods that ask for a GPU.
    from specfleet_operator.manifests import fleet_manifests
    from specfleet_operator.spec import FleetSpec

    example = COMBINATIONS["example-llama-3.1-8b-gpu"]
    fleet = one(rendered["example-llama-3.1-8b-gpu"], "SpecFleet")
    assert fleet["spec"]["models"] == example["models"]
    assert fleet["spec"]["models"]["drafters"] == [{"name": "one-b", "path": "llama-3.2-1b"}]
    spec = FleetSpec.from_dict(fleet["metadata"]["name"], fleet["spec"])
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
            for d in fleet_manifests(spec) if d["kind"] == "Deployment"}
    target = ["--target", "/models/llama-3.1-8b"]
    weights = ["--dtype", "bfloat16", "--device", "cuda", "--max-model-len", "16384", "--kv-cache-memory", "20GiB"]
    assert pods["specfleet-drafter-one-b"]["args"][-12:] == [*target, "--drafter", "one-b=/models/llama-3.2-1b",
                                                              *weights]
    assert pods["specfleet-verifier"]["args"][-10:] == [*target, *weights]
    assert pods["specfleet-router"]["args"][-4:] == [*target, "--max-model-len", "16384"]
    for name in ("specfleet-verifier", "specfleet-drafter-one-b"):
        assert pods[name]["resources"]["limits"]["nvidia.com/gpu"] == 1, name
    assert "nvidia.com/gpu" not in pods["specfleet-drafter-suffix"]["resources"]["limits"]


def test_the_head_example_runs_a_head_pool(rendered):
    # examples/bundled-head.yaml: models.head reaches the SpecFleet; the operator gives --head to the router, the
    # verifier and the head pool (a model pod, loading the target too), and to no other pool.
    from specfleet_operator.manifests import fleet_manifests
    from specfleet_operator.spec import FleetSpec

    fleet = one(rendered["example-bundled-head"], "SpecFleet")
    assert fleet["spec"]["models"]["head"] == "head"
    assert [pool["name"] for pool in fleet["spec"]["drafters"]] == ["head", "python", "suffix"]
    spec = FleetSpec.from_dict(fleet["metadata"]["name"], fleet["spec"])
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
            for d in fleet_manifests(spec) if d["kind"] == "Deployment"}
    head = ["--head", "/models/head"]
    cpu = ["--device", "cpu"]  # model pods without a GPU request say so (never `auto` on a node's GPUs)
    assert pods["specfleet-drafter-head"]["args"][-8:] == ["--models", "/models", "--pool", "head", *head, *cpu]
    assert pods["specfleet-verifier"]["args"][-4:] == [*head, *cpu]
    assert pods["specfleet-router"]["args"][-2:] == head  # the router holds no weights: no device
    assert "head=specfleet-drafter-head:50051" in ",".join(pods["specfleet-router"]["args"])
    for name in ("specfleet-drafter-python", "specfleet-drafter-suffix"):
        assert "--head" not in pods[name]["args"], name
    assert pods["specfleet-drafter-head"]["resources"]["limits"] == {"cpu": "4", "memory": "4Gi"}


def _secret_refs(docs):
    """(secret name, key) of every Secret key a chart pod reads (mounted as a file: never through the environment)."""
    refs = set()
    for _, _, spec in pod_specs(docs):
        for container in containers(spec):
            refs.update(ref for ref in secret_files(spec, container).values() if ref[1] != "*")
    return refs


def _rendered_secret_keys(docs):
    return {(s["metadata"]["name"], key) for s in find(docs, "Secret") for key in s.get("stringData", {})}


def test_in_cluster_redis_has_auth_persistence_and_a_url_secret(rendered):
    docs = rendered["defaults"]
    redis = one(docs, "StatefulSet", "specfleet-redis")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:3] == ["/etc/redis/redis.conf", "--appendonly", "yes"]
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert "exec" in container["livenessProbe"] and "ping" in container["readinessProbe"]["exec"]["command"][-1]
    # the probes' redis-cli reads the password from the mounted file, for that one command
    assert 'REDISCLI_AUTH="$(cat /etc/redis/password)"' in container["livenessProbe"]["exec"]["command"][-1]
    assert secret_files(redis["spec"]["template"]["spec"], container) == {
        "/etc/redis/redis.conf": ("specfleet-redis", "redis.conf"), "/etc/redis/password": ("specfleet-redis",
                                                                                            "password")}
    assert "env" not in container
    secret = one(docs, "Secret", "specfleet-redis")["stringData"]
    password = secret["password"]
    assert len(password) == 32 and password not in str(container["args"])
    assert secret["redis.conf"] == f'requirepass "{password}"\n'
    assert secret["url"] == f"redis://:{password}@specfleet-redis.specfleet-test.svc:6379/0"
    assert one(docs, "Service", "specfleet-redis")["spec"]["ports"][0]["port"] == 6379
    spec_redis = one(docs, "SpecFleet")["spec"]["redis"]
    assert spec_redis == {"mode": "inCluster", "url": "", "secretRef": {"name": "specfleet-redis", "key": "url"}}
    # The operator reads the same Secret; every secret a pod reads is rendered by the chart.
    assert ("specfleet-redis", "url") in _secret_refs(docs)
    assert _secret_refs(docs) <= _rendered_secret_keys(docs)


def test_redis_without_persistence_uses_an_empty_dir(rendered):
    redis = one(rendered["bare"], "StatefulSet", "specfleet-redis")
    assert "volumeClaimTemplates" not in redis["spec"]
    assert {"name": "data", "emptyDir": {}} in redis["spec"]["template"]["spec"]["volumes"]


def test_a_given_redis_password_is_used():
    docs = render({"redis": {"password": "p@ss word+"}})
    secret = one(docs, "Secret", "specfleet-redis")["stringData"]
    assert secret["url"] == "redis://:p%40ss%20word%2B@specfleet-redis.specfleet-test.svc:6379/0"
    assert secret["redis.conf"] == 'requirepass "p@ss word+"\n'
    # The services parse the URL with redis-py: they must get the password back unchanged.
    assert parse_url(secret["url"])["password"] == "p@ss word+"


@pytest.mark.parametrize("name, secret, key", [("external-redis-url", "specfleet-redis", "url"),
                                               ("external-redis-secret", "my-redis", "redis-url")])
def test_external_redis_runs_no_redis_and_points_pods_at_the_secret(rendered, name, secret, key):
    docs = rendered[name]
    assert not find(docs, "StatefulSet") and not find(docs, "Service")
    assert not [p for p in find(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-redis")]
    spec_redis = one(docs, "SpecFleet")["spec"]["redis"]
    assert spec_redis == {"mode": "external", "url": "", "secretRef": {"name": secret, "key": key}}
    operator_pod = one(docs, "Deployment", "specfleet-operator")["spec"]["template"]["spec"]
    operator = operator_pod["containers"][0]
    assert env_of(operator)["SPECFLEET_REDIS_URL_FILE"] == "/etc/specfleet/secrets/redis-url"
    assert secret_files(operator_pod, operator) == {"/etc/specfleet/secrets/redis-url": (secret, key)}
    if name == "external-redis-url":
        assert one(docs, "Secret", "specfleet-redis")["stringData"] == {"url": "rediss://:pw@redis.example:6380/2"}
    else:
        assert not find(docs, "Secret", "specfleet-redis")


def test_auth_on_generates_a_token_and_the_test_pod_sends_it(rendered):
    docs = rendered["defaults"]
    token = one(docs, "Secret", "specfleet-auth")["stringData"]["token"]
    assert len(token) == 40
    assert one(docs, "SpecFleet")["spec"]["auth"] == {"tokenSecretRef": {"name": "specfleet-auth", "key": "token"}}
    test_pod = one(docs, "Pod", "specfleet-test")
    generate = test_pod["spec"]["containers"][0]
    assert env_of(generate)["SPECFLEET_TOKEN_FILE"] == "/etc/specfleet/secrets/token"
    assert secret_files(test_pod["spec"], generate) == {"/etc/specfleet/secrets/token": ("specfleet-auth", "token")}
    assert token not in str(test_pod)


def test_auth_with_an_existing_secret(rendered):
    docs = rendered["auth-existing-secret"]
    assert not find(docs, "Secret", "specfleet-auth")
    assert one(docs, "SpecFleet")["spec"]["auth"] == {"tokenSecretRef": {"name": "my-token", "key": "bearer"}}
    test_pod = one(docs, "Pod", "specfleet-test")
    assert secret_files(test_pod["spec"], test_pod["spec"]["containers"][0]) == {
        "/etc/specfleet/secrets/token": ("my-token", "bearer")}


def test_auth_off_leaves_the_router_open(rendered):
    docs = rendered["auth-off"]
    assert not find(docs, "Secret", "specfleet-auth")
    assert one(docs, "SpecFleet")["spec"]["auth"]["tokenSecretRef"]["name"] == ""
    test_pod = one(docs, "Pod", "specfleet-test")["spec"]
    assert "SPECFLEET_TOKEN_FILE" not in env_of(test_pod["containers"][0])
    assert not secret_files(test_pod, test_pod["containers"][0])
    assert "SPECFLEET_TOKEN" not in render_files(COMBINATIONS["auth-off"])["specfleet/templates/NOTES.txt"]


def _policies(docs):
    return {p["metadata"]["name"]: p["spec"] for p in find(docs, "NetworkPolicy")}


def test_network_policies_deny_by_default_and_open_only_the_router(rendered):
    policies = _policies(rendered["defaults"])
    assert set(policies) == {"specfleet-default-deny", "specfleet-router", "specfleet-internal", "specfleet-redis"}
    deny = policies["specfleet-default-deny"]
    assert deny["podSelector"]["matchLabels"] == CONTRACT_POD_LABELS
    assert deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")
    router = policies["specfleet-router"]
    assert router["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
    (rule,) = router["ingress"]
    assert "from" not in rule  # anyone may reach the router's ports ...
    assert {p["port"] for p in rule["ports"]} == {"grpc", "http"}  # ... and only those
    internal = policies["specfleet-internal"]
    assert internal["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": ["fusion", "drafter", "verifier"]}]
    redis = policies["specfleet-redis"]
    for policy in (internal, redis):
        (rule,) = policy["ingress"]
        assert rule["from"] == [{"podSelector": {"matchLabels": CONTRACT_POD_LABELS}}]
    assert [p["port"] for p in internal["ingress"][0]["ports"]] == ["grpc"]
    assert [p["port"] for p in redis["ingress"][0]["ports"]] == ["redis"]


def test_restricted_router_still_admits_the_release(rendered):
    (rule,) = _policies(rendered["monitoring-restricted-router"])["specfleet-router"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"name": "ingress"}}},
                            {"podSelector": {"matchLabels": CONTRACT_POD_LABELS}}]


def test_chart_pods_carry_the_release_selector_labels(rendered):
    # The policies select the operator's role pods by the contract labels; the chart's pods carry the same ones.
    for _, metadata, _ in pod_specs(rendered["defaults"]):
        assert CONTRACT_POD_LABELS.items() <= metadata["labels"].items()


def test_network_policies_and_budgets_can_be_turned_off(rendered):
    assert not find(rendered["bare"], "NetworkPolicy")
    assert not find(rendered["bare"], "PodDisruptionBudget")


def test_one_disruption_budget_per_role_and_pool(rendered):
    budgets = {b["metadata"]["name"]: b["spec"] for b in find(rendered["defaults"], "PodDisruptionBudget")}
    assert set(budgets) == {"specfleet-router", "specfleet-fusion", "specfleet-verifier", "specfleet-drafter-python",
                            "specfleet-drafter-prose", "specfleet-drafter-c", "specfleet-drafter-general"}
    assert budgets["specfleet-drafter-c"]["selector"]["matchLabels"] == {
        **CONTRACT_POD_LABELS, "app.kubernetes.io/component": "drafter", "specfleet.io/fleet": FLEET,
        "specfleet.io/pool": "c"}
    assert all(b["maxUnavailable"] == 1 for b in budgets.values())
    gpu_budgets = {b["metadata"]["name"] for b in find(rendered["gpu"], "PodDisruptionBudget")}
    assert {"specfleet-drafter-python", "specfleet-drafter-suffix"} <= gpu_budgets


def _rules(role):
    return {(group, resource): set(rule["verbs"])
            for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}


# docs/kubernetes.md, "The operator": the operator's permissions and nothing more.
CONTRACT_RULES = {
    **{("specfleet.io", r): {"get", "list", "watch", "patch", "update"}
       for r in ("specfleets", "specfleets/status", "specfleets/scale")},
    ("specfleet.io", "specfleets/finalizers"): {"update"},  # ownerReferences with blockOwnerDeletion need it
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "pods"): {"get", "list", "watch", "patch"},  # patch: the pod-deletion-cost of a drained pod
    # the fleet's internal token and an inline Redis URL are Secrets the operator writes; it reads the Redis Secret
    ("", "secrets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}


def test_operator_rbac_is_least_privilege(rendered):
    docs = rendered["defaults"]
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")
    role = one(docs, "Role", "specfleet-operator")
    assert _rules(role) == {**CONTRACT_RULES, ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"}}
    binding = one(docs, "RoleBinding", "specfleet-operator")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "specfleet-operator"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "specfleet-operator",
                                    "namespace": "specfleet-test"}]
    operator = one(docs, "Deployment", "specfleet-operator")["spec"]["template"]["spec"]
    assert operator["serviceAccountName"] == "specfleet-operator"
    container = operator["containers"][0]
    assert container["command"] + container["args"] == ["specfleet", "operator", "run",
                                                        "--namespace", "specfleet-test"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert env_of(container)["SPECFLEET_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    peering = one(docs, "KopfPeering", "specfleet")
    assert peering["metadata"]["namespace"] == "specfleet-test"
    # Nothing else in the release talks to the API server.
    for where, _, spec in pod_specs(docs):
        if where != "Deployment/specfleet-operator":
            assert spec["automountServiceAccountToken"] is False, where


def test_watching_all_namespaces_uses_a_cluster_role(rendered):
    docs = rendered["all-namespaces"]
    assert not find(docs, "Role") and not find(docs, "RoleBinding")
    role = one(docs, "ClusterRole")
    assert _rules(role) == {**CONTRACT_RULES, ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
                            ("", "namespaces"): {"get", "list", "watch"}}
    assert one(docs, "ClusterRoleBinding")["roleRef"]["name"] == role["metadata"]["name"]
    assert one(docs, "ClusterKopfPeering", "specfleet")
    container = one(docs, "Deployment", "specfleet-operator")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["operator", "run"]


def test_service_monitor_scrapes_the_router(rendered):
    docs = rendered["monitoring-restricted-router"]
    monitor = one(docs, "ServiceMonitor", "specfleet-router")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    service = one(docs, "Service", "specfleet-router-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"] == {**CONTRACT_POD_LABELS, "app.kubernetes.io/component": "router",
                                           "specfleet.io/fleet": FLEET}
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["specfleet-test"]}
    assert not find(rendered["defaults"], "ServiceMonitor")


def test_helm_test_pod_checks_health_of_every_role_then_generates(rendered):
    docs = rendered["gpu"]
    pod = one(docs, "Pod", "specfleet-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (health,) = pod["spec"]["initContainers"]
    assert health["command"][:2] == ["python", "-c"] and "grpc_health" in health["args"][0]
    assert health["args"][1:] == ["specfleet-router:50051", "specfleet-fusion:50051", "specfleet-verifier:50051",
                                  "specfleet-drafter-python:50051", "specfleet-drafter-suffix:50051"]
    (generate,) = pod["spec"]["containers"]
    assert generate["command"] + generate["args"] == [
        "specfleet", "client", "generate", "def main():", "--target", "specfleet-router:50051",
        "--max-new-tokens", "8"]
    compile(health["args"][0], "health-check", "exec")  # the inline script is valid Python


def test_cert_manager_issues_the_internal_certificate(rendered):
    docs = rendered["mtls-cert-manager"]
    cert = one(docs, "Certificate", "specfleet-internal-tls")
    spec = cert["spec"]
    assert spec["secretName"] == "specfleet-internal-tls"
    assert spec["issuerRef"] == {"name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert {"server auth", "client auth"} <= set(spec["usages"])
    assert spec["dnsNames"][0] == "specfleet-internal"  # the name the router checks (it dials pod IPs)
    assert {"specfleet-verifier", "specfleet-verifier.specfleet-test.svc", "specfleet-drafter-python"} <= set(
        spec["dnsNames"])
    assert spec["privateKey"]["rotationPolicy"] == "Always"
    fleet = one(docs, "SpecFleet")
    assert fleet["spec"]["tls"] == {"internal": {"secretName": "specfleet-internal-tls",
                                                 "serverName": "specfleet-internal"}}
    for name in ("defaults", "mtls-existing-secret"):
        assert not find(rendered[name], "Certificate"), name
    assert "tls" not in one(rendered["defaults"], "SpecFleet")["spec"]


def test_mtls_with_an_existing_secret_reaches_the_fleet_and_its_health_checks(rendered):
    docs = rendered["mtls-existing-secret"]
    assert one(docs, "SpecFleet")["spec"]["tls"] == {"internal": {"secretName": "my-internal-tls",
                                                                  "serverName": "specfleet.internal"}}
    # helm test checks the internal roles on their plaintext health-only port, the router on its own
    health = one(docs, "Pod", "specfleet-test")["spec"]["initContainers"][0]
    pools = [f"specfleet-drafter-{pool['name']}:50052" for pool in chart_values()["drafter"]]
    assert health["args"][1:] == ["specfleet-router:50051", "specfleet-fusion:50052", "specfleet-verifier:50052",
                                  *pools]
    internal = one(docs, "NetworkPolicy", "specfleet-internal")
    assert {p["port"] for p in internal["spec"]["ingress"][0]["ports"]} == {"grpc", "health"}
    internal = one(rendered["defaults"], "NetworkPolicy", "specfleet-internal")
    assert {p["port"] for p in internal["spec"]["ingress"][0]["ports"]} == {"grpc"}


def test_helm_test_arguments_parse_with_the_real_cli():
    from specfleet.sdk.cli import add_client_parser

    parser = argparse.ArgumentParser()
    add_client_parser(parser.add_subparsers(dest="command"))
    generate = one(render(), "Pod", "specfleet-test")["spec"]["containers"][0]
    args = parser.parse_args(generate["args"])
    assert (args.target, args.max_new_tokens, args.prompt) == ("specfleet-router:50051", 8, "def main():")


def test_notes_tell_the_next_commands():
    notes = render_files()["specfleet/templates/NOTES.txt"]
    for expected in ("kubectl -n specfleet-test get specfleet specfleet",
                     "kubectl -n specfleet-test scale specfleet/specfleet --replicas=",
                     "port-forward svc/specfleet-router 50051:50051 8000:8000",
                     "specfleet client generate", 'base_url="http://127.0.0.1:8000/v1"',
                     "get secret specfleet-auth", "helm test specfleet"):
        assert expected in notes, expected


def test_the_operator_reads_every_rendered_fleet(rendered):
    # The operator's own spec parser accepts what the chart renders, and sees the roles the values describe.
    from specfleet_operator.spec import FleetSpec  # the project's own operator: never skipped

    for name, docs in rendered.items():
        fleet = one(docs, "SpecFleet")
        spec = FleetSpec.from_dict(fleet["metadata"]["name"], fleet["spec"])
        values = {**chart_values(), **COMBINATIONS[name]}
        pools = [f"drafter-{pool['name']}" for pool in values["drafter"]]
        assert spec.role_keys == ("router", "fusion", *pools, "verifier"), name
        assert spec.redis_secret_name == fleet["spec"]["redis"]["secretRef"]["name"], name
        assert spec.role("verifier").gpu is bool(values["verifier"].get("gpu")), name


def test_scheduling_and_pull_secrets_reach_the_chart_pods(rendered):
    bare = COMBINATIONS["bare"]
    docs = rendered["bare"]
    operator = one(docs, "Deployment", "specfleet-operator")["spec"]["template"]["spec"]
    redis = one(docs, "StatefulSet", "specfleet-redis")["spec"]["template"]["spec"]
    assert operator["nodeSelector"] == bare["operator"]["nodeSelector"]
    assert operator["tolerations"] == bare["operator"]["tolerations"]
    assert redis["affinity"] == bare["redis"]["affinity"]
    for _, _, spec in pod_specs(docs):
        assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
    for _, _, spec in pod_specs(rendered["defaults"]):
        assert not {"imagePullSecrets", "nodeSelector", "tolerations", "affinity"} & set(spec)


def test_helm_test_health_script_passes_against_a_real_health_service():
    # Run the init container's script as the pod would, against two real gRPC health servers on loopback.
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    servers, targets = [], []
    for _ in range(2):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        targets.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        server.start()
        servers.append(server)
    try:
        script = one(render(), "Pod", "specfleet-test")["spec"]["initContainers"][0]["args"][0]
        result = subprocess.run([sys.executable, "-c", script, *targets], capture_output=True, text=True,
                                timeout=60, check=False)
    finally:
        for server in servers:
            server.stop(None)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split("\n")[:2]) == sorted(f"{t}: SERVING" for t in targets)
