"""Kubernetes objects for a SpecFleet, as plain dicts: per role a Deployment, a Service and a ConfigMap, plus the
Secrets the operator owns. Pure: the same spec and replica counts always give the same objects.

Everything here follows docs/kubernetes.md (the contract with the chart and the services): object names, labels,
ports, the container command, Secrets mounted as files (never environment variables), gRPC probes, the restricted
pod security context, /tmp as an emptyDir on a read-only root filesystem, and models from the image or a PVC at
models.path. Owner references and the namespace are added by the handlers (kopf.adopt). The policy checks these
objects knowingly fail carry their reason as a `checkov.io/skip-<check>` annotation (`make scan`)."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from specfleet.engine.models import MODEL_FREE
from specfleet_operator.spec import DRAFTER, FUSION, HEAD_POOL, ROUTER, VERIFIER, FleetSpec, RoleSpec, SpecError

GRPC_PORT, HTTP_PORT, HEALTH_PORT = 50051, 8000, 50052
TLS_DIR = "/etc/specfleet/tls"  # the internal TLS Secret, read-only (tls.crt, tls.key, ca.crt)
# the Secrets a role reads, projected read-only into one folder: the services take each as a *_FILE variable
SECRETS_DIR = "/etc/specfleet/secrets"
REDIS_URL_FILE, TOKEN_FILE, INTERNAL_TOKEN_FILE = "redis-url", "token", "internal-token"
USER_ID = 10001
GPU_RESOURCE = "nvidia.com/gpu"
MANAGED_BY = "specfleet-operator"
CONFIG_HASH = "specfleet.io/config-hash"
INTERNAL_TOKEN_KEY = "token"
_DNS_LABEL_MAX = 63


def object_name(fleet: str, role_key: str) -> str:
    """`<fleet>-router`, `<fleet>-fusion`, `<fleet>-verifier`, `<fleet>-drafter-<pool>`: Deployment, Service and
    ConfigMap share it."""
    name = f"{fleet}-{role_key}"
    if len(name) > _DNS_LABEL_MAX:
        raise SpecError(f"object name {name!r} is {len(name)} characters; Service names allow {_DNS_LABEL_MAX}: "
                        "shorten the SpecFleet name or the drafter pool name")
    return name


def internal_token_secret_name(fleet: str) -> str:
    return f"{fleet}-internal-token"


def selector_labels(fleet: str, role: RoleSpec) -> dict[str, str]:
    """The labels a role's Deployment selects its pods by (immutable once created)."""
    labels = {"app.kubernetes.io/name": "specfleet", "app.kubernetes.io/instance": fleet,
              "app.kubernetes.io/component": role.component}
    if role.pool is not None:
        labels["specfleet.io/pool"] = role.pool
    return labels


def labels(fleet: str, role: RoleSpec) -> dict[str, str]:
    """Every label the contract puts on a role's objects and pods."""
    out = selector_labels(fleet, role)
    out.update({"app.kubernetes.io/managed-by": MANAGED_BY, "specfleet.io/fleet": fleet})
    return dict(sorted(out.items()))


def verifier_selector(fleet: str) -> str:
    """The label selector of the verifier pods, for the scale subresource (`.status.selector`)."""
    return ",".join(f"{k}={v}" for k, v in sorted(
        {"app.kubernetes.io/name": "specfleet", "app.kubernetes.io/instance": fleet,
         "app.kubernetes.io/component": VERIFIER}.items()))


def _address(fleet: str, role_key: str) -> str:
    return f"{object_name(fleet, role_key)}:{GRPC_PORT}"


def _tls_args(spec: FleetSpec, role: RoleSpec) -> list[str]:
    """With spec.tls.internal: internal roles serve mTLS (a client certificate signed by ca.crt required) and answer
    kubelet's probes on a plaintext health-only port; the router presents the same certificate as its client one."""
    if not spec.internal_tls:
        return []
    cert, key, ca = f"{TLS_DIR}/tls.crt", f"{TLS_DIR}/tls.key", f"{TLS_DIR}/ca.crt"
    if role.component == ROUTER:
        return ["--internal-tls-ca", ca, "--internal-tls-cert", cert, "--internal-tls-key", key,
                "--internal-tls-server-name", spec.internal_server_name]
    return ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", ca, "--health-port", str(HEALTH_PORT)]


def _mtls_served(spec: FleetSpec, role: RoleSpec) -> bool:
    return spec.internal_tls and role.component != ROUTER


def _model_args(spec: FleetSpec, role: RoleSpec) -> list[str]:
    """What a role loads besides `--models` when spec.models names checkpoints by path (nothing in the bundled
    layout). Each role gets only what it reads, so changing one drafter rolls only its pool: the router the
    target (its tokenizer and context length), the verifier the target, a pool the target (for the vocabulary
    check) and its own drafter. The router and model-free pools hold no weights or KV cache, so dtype, device and KV
    memory are not theirs; a model role with `gpu: true` runs its models on the GPU it requests (`--device cuda`),
    any other model role on the CPU (`--device cpu`).

    With spec.models.head (in either layout) `--head` goes to the verifier (its model set then has a head, so it
    keeps each request's features and returns them to a router that asks: the router asks when `head` is among its
    --drafters), the head pool (it holds the head and the target, a model pod like any other) and the router (its
    model set is then the verifiers', as `specfleet up` gives every process the same one). The other pools never
    read the head, so a new head rolls none of them."""
    args = ["--target", spec.model_path(spec.models_target)] if spec.models_target else []
    folder = spec.drafter_folder(str(role.pool)) if role.component == DRAFTER else ""
    if folder:
        args += ["--drafter", f"{role.pool}={spec.model_path(folder)}"]
    if spec.has_head and (role.component in (ROUTER, VERIFIER) or role.pool == HEAD_POOL):
        args += ["--head", spec.model_path(spec.models_head)]
    weights = role.component == VERIFIER or (role.component == DRAFTER and role.pool not in MODEL_FREE)
    if spec.models_dtype and weights:
        args += ["--dtype", spec.models_dtype]
    if weights:  # the GPU the pod requests (nvidia.com/gpu, _resources) is where its models run; a pod that
        # requests none says cpu, not auto: a CUDA image (NVIDIA_VISIBLE_DEVICES=all) on a GPU node could otherwise
        # see, and take, a GPU the scheduler gave to another pod
        args += ["--device", "cuda" if role.gpu else "cpu"]
    if spec.max_model_len:
        args += ["--max-model-len", str(spec.max_model_len)]
    if spec.kv_cache_memory and weights:
        args += ["--kv-cache-memory", spec.kv_cache_memory]
    return args


def container_args(spec: FleetSpec, role: RoleSpec) -> list[str]:
    """`specfleet serve ROLE ...` exactly as docs/kubernetes.md gives it (secrets come from mounted files)."""
    common = ["serve", role.component, "--host", "0.0.0.0", "--port", str(GRPC_PORT)]
    if role.component == ROUTER:
        drafters = ",".join(f"{pool.pool}={_address(spec.name, pool.key)}" for pool in spec.pools)
        args = [*common, "--http-port", str(HTTP_PORT), "--models", spec.models_path, "--drafters", drafters,
                "--verifiers", _address(spec.name, VERIFIER), "--fusion", _address(spec.name, FUSION)]
    elif role.component == DRAFTER:
        args = [*common, "--models", spec.models_path, "--pool", str(role.pool)]
    elif role.component == VERIFIER:
        args = [*common, "--models", spec.models_path]
    else:
        return common + _tls_args(spec, role)  # fusion reads no model
    return args + _model_args(spec, role) + _tls_args(spec, role)


def config_data(spec: FleetSpec, role: RoleSpec) -> dict[str, str]:
    """The role's non-secret settings, given to the container as environment variables (envFrom)."""
    data = {
        "SPECFLEET_ROLE": role.component,
        "SPECFLEET_FLEET": spec.name,
        "HF_HUB_OFFLINE": "1",  # models come from models.path, never from a hub
        "HF_HOME": "/tmp/hf",  # the root filesystem is read-only; /tmp is the writable emptyDir
        "HOME": "/tmp",
        "PYTHONUNBUFFERED": "1",
    }
    if role.pool is not None:
        data["SPECFLEET_POOL"] = role.pool
        data["SPECFLEET_DRAFTER_MODEL"] = role.model
    if spec.otlp_endpoint:
        data["OTEL_EXPORTER_OTLP_ENDPOINT"] = spec.otlp_endpoint
        data["OTEL_SERVICE_NAME"] = f"specfleet-{role.component}"
    return dict(sorted(data.items()))


def config_map(spec: FleetSpec, role: RoleSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": object_name(spec.name, role.key), "labels": labels(spec.name, role)},
            "data": config_data(spec, role)}


def _secret_files(spec: FleetSpec, role: RoleSpec) -> list[tuple[str, str, str, str]]:
    """(environment variable, file under SECRETS_DIR, Secret, key) for each secret the role reads: the Redis URL;
    the router the public token (when auth is on) and the internal token it sends; the others the internal token
    they require, as their own token."""
    files = [("SPECFLEET_REDIS_URL_FILE", REDIS_URL_FILE, spec.redis_secret_name, spec.redis_secret.key)]
    internal = internal_token_secret_name(spec.name)
    if role.component == ROUTER:
        if spec.token_secret.name:
            files.append(("SPECFLEET_TOKEN_FILE", TOKEN_FILE, spec.token_secret.name, spec.token_secret.key))
        files.append(("SPECFLEET_INTERNAL_TOKEN_FILE", INTERNAL_TOKEN_FILE, internal, INTERNAL_TOKEN_KEY))
    else:
        files.append(("SPECFLEET_TOKEN_FILE", TOKEN_FILE, internal, INTERNAL_TOKEN_KEY))
    return files


def _secrets_volume(spec: FleetSpec, role: RoleSpec) -> dict[str, Any]:
    """One projected volume with each Secret key as a file, 0440 and the pod's fsGroup: readable by the service's
    user only (an environment variable would show in `kubectl describe`, crash dumps and child processes)."""
    sources = [{"secret": {"name": secret, "items": [{"key": key, "path": path}]}}
               for _, path, secret, key in _secret_files(spec, role)]
    return {"name": "secrets", "projected": {"sources": sources, "defaultMode": 0o440}}


def _env(spec: FleetSpec, role: RoleSpec) -> list[dict[str, Any]]:
    env = [
        {"name": "SPECFLEET_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "SPECFLEET_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    # paths, not secrets
    env += [{"name": var, "value": f"{SECRETS_DIR}/{path}"} for var, path, _, _ in _secret_files(spec, role)]
    return env


def image(spec: FleetSpec) -> str:
    """repository@digest when spec.image.digest is set (the tag then only documents), else repository:tag."""
    if spec.image_digest:
        return f"{spec.image_repository}@{spec.image_digest}"
    return f"{spec.image_repository}:{spec.image_tag}"


def policy_skips(spec: FleetSpec) -> dict[str, str]:
    """checkov annotations for the checks a role's Deployment knowingly fails, each with its one-line reason (no
    `=` in a reason: checkov splits on it). One key per check, so a stale one left by a merge patch still names the
    right check. docs/kubernetes.md lists them."""
    reasons = {}
    if not spec.image_digest:
        reasons["CKV_K8S_43"] = "no spec.image.digest set (unknown before the image is published)"
    if spec.image_pull_policy != "Always":
        reasons["CKV_K8S_15"] = "spec.image.pullPolicy is the user's; with a digest IfNotPresent cannot go stale"
    return {f"checkov.io/skip-{check}": f"{check}={reason}" for check, reason in sorted(reasons.items())}


def _resources(role: RoleSpec) -> dict[str, Any]:
    """The role's resources, with one GPU requested when gpu is on (a GPU count the user gave is kept)."""
    resources = copy.deepcopy(role.resources)
    if role.gpu:
        limits = resources.setdefault("limits", {})
        limits.setdefault(GPU_RESOURCE, 1)
        requests = resources.get("requests")
        if isinstance(requests, dict) and GPU_RESOURCE in requests:  # requests must equal limits for extended ones
            limits[GPU_RESOURCE] = requests[GPU_RESOURCE]
    return resources


def _ports(spec: FleetSpec, role: RoleSpec) -> list[dict[str, Any]]:
    ports = [{"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"}]
    if role.component == ROUTER:
        ports.append({"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"})
    if _mtls_served(spec, role):
        ports.append({"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"})
    return ports


def _container_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": USER_ID, "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _probe(port: int, period_s: int, failures: int, timeout_s: int = 5) -> dict[str, Any]:
    return {"grpc": {"port": port}, "periodSeconds": period_s, "failureThreshold": failures,
            "timeoutSeconds": timeout_s}


def config_hash(spec: FleetSpec, role: RoleSpec) -> str:
    """A hash of the role's ConfigMap data: in the pod template, so a settings change rolls the pods."""
    return hashlib.sha256(json.dumps(config_data(spec, role), sort_keys=True).encode()).hexdigest()[:16]


def _rollout(role: RoleSpec) -> dict[str, int]:
    """CPU roles surge one pod first (never fewer ready pods); GPU roles replace one at a time, since a spare GPU
    for a surge pod may not exist. Either way no request is lost: a stopping pod drains (health NOT_SERVING, its
    in-flight calls finish) and request state lives in Redis."""
    return {"maxUnavailable": 1, "maxSurge": 0} if role.gpu else {"maxUnavailable": 0, "maxSurge": 1}


def deployment(spec: FleetSpec, role: RoleSpec, replicas: int) -> dict[str, Any]:
    name = object_name(spec.name, role.key)
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, _secrets_volume(spec, role)]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"},
                                    {"name": "secrets", "mountPath": SECRETS_DIR, "readOnly": True}]
    if spec.models_source == "pvc" and role.component != FUSION:  # fusion never reads the models
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": spec.models_claim, "readOnly": True}})
        mounts.append({"name": "models", "mountPath": spec.models_path, "readOnly": True})
    if spec.internal_tls:  # 0440 and the pod's fsGroup: readable by the service's user only
        volumes.append({"name": "internal-tls", "secret": {"secretName": spec.internal_tls_secret,
                                                           "defaultMode": 0o440}})
        mounts.append({"name": "internal-tls", "mountPath": TLS_DIR, "readOnly": True})
    probe_port = HEALTH_PORT if _mtls_served(spec, role) else GRPC_PORT  # kubelet probes carry no client cert
    container = {
        "name": role.component,
        "image": image(spec),
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["specfleet"],
        "args": container_args(spec, role),
        "ports": _ports(spec, role),
        "envFrom": [{"configMapRef": {"name": name}}],
        "env": _env(spec, role),
        "resources": _resources(role),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
        # model loading can take minutes on a cold node: the startup probe allows 10 of them before liveness counts
        "startupProbe": _probe(probe_port, period_s=5, failures=120),
        "readinessProbe": _probe(probe_port, period_s=5, failures=2),
        "livenessProbe": _probe(probe_port, period_s=10, failures=6),
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # role pods never talk to the Kubernetes API
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID, "fsGroup": USER_ID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        # a draining pod finishes its in-flight calls (the services' --grace) before it is killed
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": volumes,
    }
    if role.node_selector:
        pod_spec["nodeSelector"] = dict(role.node_selector)
    if role.tolerations:
        pod_spec["tolerations"] = copy.deepcopy(role.tolerations)
    if role.affinity:
        pod_spec["affinity"] = copy.deepcopy(role.affinity)
    pod_labels = labels(spec.name, role)
    metadata: dict[str, Any] = {"name": name, "labels": pod_labels}
    if skips := policy_skips(spec):  # never an empty dict: kube.drifted would see it differ from none forever
        metadata["annotations"] = skips
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": int(replicas),
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(spec.name, role)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": _rollout(role)},
            "template": {"metadata": {"labels": pod_labels, "annotations": {CONFIG_HASH: config_hash(spec, role)}},
                         "spec": pod_spec},
        },
    }


def service(spec: FleetSpec, role: RoleSpec) -> dict[str, Any]:
    """ClusterIP for the public router; headless for internal roles, so callers resolve every pod (dns:/// round
    robin) instead of pinning one long-lived HTTP/2 connection to one pod behind a virtual IP."""
    ports = [{"name": p["name"], "port": p["containerPort"], "targetPort": p["name"], "protocol": "TCP"}
             for p in _ports(spec, role)]
    body: dict[str, Any] = {"type": "ClusterIP", "selector": selector_labels(spec.name, role), "ports": ports}
    if role.component != ROUTER:
        body["clusterIP"] = "None"
        body["publishNotReadyAddresses"] = False
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": object_name(spec.name, role.key), "labels": labels(spec.name, role)}, "spec": body}


def _secret(name: str, fleet: str, data: Mapping[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "specfleet",
                                                  "app.kubernetes.io/instance": fleet,
                                                  "app.kubernetes.io/managed-by": MANAGED_BY,
                                                  "specfleet.io/fleet": fleet}},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def redis_url_secret(spec: FleetSpec) -> dict[str, Any] | None:
    """The Secret holding an inline `spec.redis.url` (pods always read the URL from a Secret); None when the spec
    names a Secret of its own or gives no URL (then the chart's `<fleet>-redis` Secret is used)."""
    if not spec.redis_url or spec.redis_secret.name:
        return None
    return _secret(spec.redis_secret_name, spec.name, {spec.redis_secret.key: spec.redis_url})


def internal_token_secret(spec: FleetSpec, token: str) -> dict[str, Any]:
    """The token the router sends to the internal services and they require; created once, never rotated here."""
    if len(token) < 16:
        raise ValueError("the internal token must be at least 16 characters (use secrets.token_urlsafe(32))")
    return _secret(internal_token_secret_name(spec.name), spec.name, {INTERNAL_TOKEN_KEY: token})


def fleet_manifests(spec: FleetSpec, replicas: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """Every object the operator applies for `spec` (the internal token Secret aside: it is created once), in apply
    order: Secrets, ConfigMaps, Services, then Deployments at `replicas` (default: each role's spec replicas)."""
    replicas = replicas or {}
    secret = redis_url_secret(spec)
    objects: list[dict[str, Any]] = [secret] if secret else []
    objects += [config_map(spec, role) for role in spec.roles]
    objects += [service(spec, role) for role in spec.roles]
    objects += [deployment(spec, role, replicas.get(role.key, role.clamp(role.replicas))) for role in spec.roles]
    return objects
