"""The SpecFleet spec as typed, defaulted Python objects.

The API server fills in the CRD's defaults, but the operator must not depend on that (a kmock test server, an old
object, a local `specfleet up --autoscale` have none), so `FleetSpec.from_dict` applies the same defaults; a test
checks the two agree. Role keys name one scalable unit: `router`, `fusion`, `verifier`, `drafter-<pool>`.

Models come either in the bundled layout under models.path (`target/`, `drafter-<pool>/`) or by path: models.target
and models.drafters ({name, path}, folders under models.path), pools then named after a declared drafter. A draft
head (models.head, a folder under models.path in either layout) is what a pool named `head` serves; the spec must
name it for such a pool, even the bundled `head/`, since the operator cannot look into the image or the volume."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from specfleet.engine.models import DTYPES, MODEL_FREE
from specfleet.engine.models import NAME as DRAFTER_NAME

ROUTER, FUSION, VERIFIER, DRAFTER = "router", "fusion", "verifier", "drafter"
DRAFTER_PREFIX = "drafter-"
# the draft head's pool (specfleet.engine.head.HEAD; a test checks they agree): it serves spec.models.head
HEAD_POOL = "head"
_POOL_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# A model folder under models.path: relative, no empty, `.` or `..` segment (a pod never reads outside the models
# volume); the CRD's pattern is the same (a test checks it).
MODEL_FOLDER = re.compile(r"^(\.?[^/.][^/]*|\.\.[^/]+)(/(\.?[^/.][^/]*|\.\.[^/]+))*/?$")
# What `--kv-cache-memory` accepts (specfleet.cli.options.byte_size; a test checks the two agree): a number and an
# optional unit b, k, kb, kib, m, ... tib in any case. Kubernetes' `Gi` is not one of them.
IMAGE_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
KV_CACHE_MEMORY = re.compile(r"^\s*([0-9]+|[0-9]*\.[0-9]+)\s*([kKmMgGtT][iI]?[bB]?|[bB])?\s*$")


class SpecError(ValueError):
    """The SpecFleet spec is invalid; the message names the field and what to write instead."""


def drafter_key(pool: str) -> str:
    return DRAFTER_PREFIX + pool


def component_of(role_key: str) -> str:
    """`drafter-python` -> `drafter`; other role keys are their own component."""
    return DRAFTER if role_key.startswith(DRAFTER_PREFIX) else role_key


def pool_of(role_key: str) -> str | None:
    return role_key[len(DRAFTER_PREFIX):] if role_key.startswith(DRAFTER_PREFIX) else None


def _int(raw: Mapping[str, Any], name: str, default: int, where: str, minimum: int = 0) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{where}.{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(raw: Mapping[str, Any], name: str, default: float, where: str, maximum: float | None = None) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise SpecError(f"{where}.{name} must be a number > 0, got {value!r}")
    if maximum is not None and value > maximum:
        raise SpecError(f"{where}.{name} must be <= {maximum}, got {value!r}")
    return float(value)


def _str(raw: Mapping[str, Any], name: str, default: str, where: str, choices: tuple[str, ...] = ()) -> str:
    value = raw.get(name, default)
    if not isinstance(value, str) or (choices and value not in choices):
        wanted = f"one of {', '.join(choices)}" if choices else "a string"
        raise SpecError(f"{where}.{name} must be {wanted}, got {value!r}")
    return value


def _digest(image: Mapping[str, Any]) -> str:
    value = _str(image, "digest", "", "spec.image")
    if value and not IMAGE_DIGEST.fullmatch(value):
        raise SpecError(f"spec.image.digest must be sha256:<64 lowercase hex digits> (as `docker buildx imagetools "
                        f"inspect` prints it), got {value!r}")
    return value


def _section(raw: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}.{name} must be an object, got {type(value).__name__}")
    return value


def _folder(value: Any, where: str) -> str:
    """A model folder under spec.models.path: relative to it and without `..`, so a pod never reads outside the
    models volume."""
    if not isinstance(value, str) or not MODEL_FOLDER.fullmatch(value):
        raise SpecError(f"{where} must be a folder under spec.models.path, relative to it and without '..' (e.g. "
                        f"llama-3.1-8b), got {value!r}")
    return str(PurePosixPath(value))


def _drafters(raw: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """spec.models.drafters: [{name, path}] -> ((name, folder), ...), names valid and distinct."""
    where = "spec.models.drafters"
    items = raw.get("drafters") or []
    if not isinstance(items, list):
        raise SpecError(f"{where} must be a list of {{name, path}}, got {type(items).__name__}")
    out: dict[str, str] = {}
    for index, item in enumerate(items):
        at = f"{where}[{index}]"
        if not isinstance(item, Mapping):
            raise SpecError(f"{at} must be an object {{name, path}}, got {type(item).__name__}")
        name = item.get("name")
        if not isinstance(name, str) or not DRAFTER_NAME.match(name) or name in MODEL_FREE or name == HEAD_POOL:
            raise SpecError(f"{at}.name must be a DNS label of at most 40 characters (lower-case letters, digits, "
                            f"'-') other than the model-free pools {', '.join(MODEL_FREE)} and {HEAD_POOL} (a draft "
                            f"head is given as spec.models.head), got {name!r}")
        if name in out:
            raise SpecError(f"{at}.name {name!r} is used by two drafters: give each drafter its own name")
        out[name] = _folder(item.get("path"), f"{at}.path")
    return tuple(out.items())


def _kv_cache_memory(raw: Mapping[str, Any]) -> str:
    value = raw.get("kvCacheMemory", "")
    if value == "":
        return ""
    match = KV_CACHE_MEMORY.fullmatch(value) if isinstance(value, str) else None
    if not match or float(match.group(1)) <= 0:
        raise SpecError(f"spec.models.kvCacheMemory must be a size > 0 as --kv-cache-memory takes it, e.g. 4GiB, "
                        f"512MiB, 4Gi or 1.5GB, got {value!r}")
    return value


@dataclass(frozen=True)
class RoleSpec:
    """One scalable role (or drafter pool): replica bounds and scheduling."""

    key: str  # router | fusion | verifier | drafter-<pool>
    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 4
    gpu: bool = False
    model: str = ""  # drafter pools: the model folder under models.path ("" for model-free pools)
    resources: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] = field(default_factory=dict)

    @property
    def component(self) -> str:
        return component_of(self.key)

    @property
    def pool(self) -> str | None:
        return pool_of(self.key)

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, int(replicas)))

    @classmethod
    def from_dict(cls, key: str, raw: Mapping[str, Any], where: str, max_default: int, gpu_default: bool,
                  model_default: str = "") -> RoleSpec:
        if not isinstance(raw, Mapping):
            raise SpecError(f"{where} must be an object, got {type(raw).__name__}")
        role = cls(
            key=key,
            replicas=_int(raw, "replicas", 1, where),
            min_replicas=_int(raw, "minReplicas", 1, where),
            max_replicas=_int(raw, "maxReplicas", max_default, where, minimum=1),
            gpu=bool(raw.get("gpu", gpu_default)),
            model=_str(raw, "model", model_default, where),
            resources=copy.deepcopy(dict(raw.get("resources") or {})),
            node_selector=dict(raw.get("nodeSelector") or {}),
            tolerations=copy.deepcopy(list(raw.get("tolerations") or [])),
            affinity=copy.deepcopy(dict(raw.get("affinity") or {})),
        )
        if role.min_replicas > role.max_replicas:
            raise SpecError(f"{where}: minReplicas ({role.min_replicas}) must be <= maxReplicas ({role.max_replicas})")
        return role


@dataclass(frozen=True)
class Targets:
    queue_wait_ms: float = 50.0
    gpu_utilization_percent: float = 90.0
    drafter_verifier_balance: float = 1.0


@dataclass(frozen=True)
class Autoscaling:
    enabled: bool = True
    speculation_parallelism: bool = False
    k: int = 4
    targets: Targets = field(default_factory=Targets)
    # Defaults tuned with `specfleet simulate`'s policy scoring (docs/simulator.md): an up window of 15 s is two
    # agreeing samples at the operator's 10-s interval (one noisy sample never adds pods, yet a surge is answered at
    # once); the 210-s down window keeps noise from removing pods; a scale-up may follow 45 s after a change, a
    # scale-down only 120 s after one, so capacity is removed in fewer, larger steps.
    window_up_s: int = 15
    window_down_s: int = 210
    max_step: int = 2
    cooldown_s: int = 45  # after a change, before a scale-up
    scale_down_cooldown_s: int = 120  # after a change, before a scale-down

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Autoscaling:
        where = "spec.autoscaling"
        targets = _section(raw, "targets", where)
        windows = _section(raw, "stabilizationWindowSeconds", where)
        return cls(
            enabled=bool(raw.get("enabled", True)),
            speculation_parallelism=bool(raw.get("speculationParallelism", False)),
            k=_int(raw, "k", 4, where, minimum=1),
            targets=Targets(
                queue_wait_ms=_number(targets, "queueWaitMs", 50, f"{where}.targets"),
                gpu_utilization_percent=_number(targets, "gpuUtilizationPercent", 90, f"{where}.targets", 100),
                drafter_verifier_balance=_number(targets, "drafterVerifierBalance", 1.0, f"{where}.targets"),
            ),
            window_up_s=_int(windows, "up", 15, f"{where}.stabilizationWindowSeconds"),
            window_down_s=_int(windows, "down", 210, f"{where}.stabilizationWindowSeconds"),
            max_step=_int(raw, "maxStep", 2, where, minimum=1),
            cooldown_s=_int(raw, "cooldownSeconds", 45, where),
            scale_down_cooldown_s=_int(raw, "scaleDownCooldownSeconds", 120, where),
        )


@dataclass(frozen=True)
class SecretRef:
    name: str = ""
    key: str = "url"


@dataclass(frozen=True)
class FleetSpec:
    """A whole SpecFleet spec; `roles` lists every scalable unit in a fixed order (router, fusion, pools, verifier)."""

    name: str
    roles: tuple[RoleSpec, ...]
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    image_repository: str = "ghcr.io/specfleet/specfleet"
    image_tag: str = "0.1.0"
    image_pull_policy: str = "IfNotPresent"
    image_digest: str = ""  # sha256:<64 hex>; when set, pods run repository@digest and the tag is ignored
    models_source: str = "image"
    models_path: str = "/models"
    models_claim: str = ""
    redis_mode: str = "inCluster"
    redis_url: str = ""  # only when the spec carries it inline; pods still read it from a Secret
    redis_secret: SecretRef = field(default_factory=SecretRef)
    token_secret: SecretRef = field(default_factory=lambda: SecretRef("", "token"))
    # Models by path (all empty: the bundled layout, models.path/target and models.path/drafter-<pool>): folders
    # under models.path, and the services' dtype and KV options (empty or 0: the services' defaults)
    models_target: str = ""
    models_drafters: tuple[tuple[str, str], ...] = ()  # (name, folder); pools name these
    # the draft head's folder under models.path ("": none); the `head` pool serves it, and the pods that build the
    # model set the head belongs to (router, verifier, that pool) get --head, so the verifiers keep the features
    models_head: str = ""
    models_dtype: str = ""
    max_model_len: int = 0
    kv_cache_memory: str = ""
    otlp_endpoint: str = ""
    # mTLS between the router and the internal roles: a kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt: the
    # layout cert-manager writes) whose certificate carries internal_server_name and both server and client auth
    internal_tls_secret: str = ""
    internal_tls_server_name: str = ""

    @property
    def internal_tls(self) -> bool:
        return bool(self.internal_tls_secret)

    @property
    def internal_server_name(self) -> str:
        """The DNS name the router checks on internal certificates (it dials pod IPs): serverName, else
        `<fleet>-internal`."""
        return self.internal_tls_server_name or f"{self.name}-internal"

    def role(self, key: str) -> RoleSpec:
        for role in self.roles:
            if role.key == key:
                return role
        raise KeyError(f"fleet {self.name!r} has no role {key!r} (it has {', '.join(self.role_keys)})")

    @property
    def role_keys(self) -> tuple[str, ...]:
        return tuple(role.key for role in self.roles)

    @property
    def pools(self) -> tuple[RoleSpec, ...]:
        return tuple(role for role in self.roles if role.component == DRAFTER)

    @property
    def has_head(self) -> bool:
        return bool(self.models_head)

    def model_path(self, folder: str) -> str:
        """Where a pod finds a model folder of the spec: under models.path."""
        return str(PurePosixPath(self.models_path) / folder)

    def drafter_folder(self, pool: str) -> str:
        """The folder under models.path of a pool's drafter declared in models.drafters ("" when not declared: a
        model-free pool, or the bundled layout)."""
        return dict(self.models_drafters).get(pool, "")

    @property
    def redis_secret_name(self) -> str:
        """The Secret pods read SPECFLEET_REDIS_URL from: secretRef.name, else `<fleet>-redis`."""
        return self.redis_secret.name or f"{self.name}-redis"

    @classmethod
    def from_dict(cls, name: str, raw: Mapping[str, Any] | None) -> FleetSpec:
        """Parse and default a SpecFleet `spec`; raises SpecError naming the bad field."""
        raw = raw or {}
        if not isinstance(raw, Mapping):
            raise SpecError(f"spec must be an object, got {type(raw).__name__}")
        image, models = _section(raw, "image", "spec"), _section(raw, "models", "spec")
        redis, auth = _section(raw, "redis", "spec"), _section(raw, "auth", "spec")
        secret, token = _section(redis, "secretRef", "spec.redis"), _section(auth, "tokenSecretRef", "spec.auth")
        internal_tls = _section(_section(raw, "tls", "spec"), "internal", "spec.tls")
        pools_raw = raw.get("drafters")
        if pools_raw is None:
            pools_raw = [{"name": "python", "model": "drafter-python"}]
        if not isinstance(pools_raw, list) or not pools_raw:
            raise SpecError("spec.drafters must be a non-empty list of pools, e.g. [{name: python, model: "
                            "drafter-python}]")
        drafters = _drafters(models)
        head = _folder(models["head"], "spec.models.head") if models.get("head") else ""
        pools = []
        for index, pool in enumerate(pools_raw):
            where = f"spec.drafters[{index}]"
            pool_name = pool.get("name") if isinstance(pool, Mapping) else None
            if not isinstance(pool_name, str) or not _POOL_NAME.match(pool_name) or len(pool_name) > 40:
                raise SpecError(f"{where}.name must be a DNS label of at most 40 characters, got {pool_name!r}")
            if drafter_key(pool_name) in {p.key for p in pools}:
                raise SpecError(f"{where}.name {pool_name!r} is used by two pools: give each pool its own name")
            role = RoleSpec.from_dict(drafter_key(pool_name), pool, where, max_default=8, gpu_default=True)
            if pool_name == HEAD_POOL:  # either layout: its folder is spec.models.head
                role = _head_pool(role, head, where)
            elif drafters:  # pools are declared by drafter name; their folder comes from models.drafters
                role = _declared_pool(role, dict(drafters), where)
            pools.append(role)
        roles = (
            RoleSpec.from_dict(ROUTER, _section(raw, "router", "spec"), "spec.router", 4, False),
            RoleSpec.from_dict(FUSION, _section(raw, "fusion", "spec"), "spec.fusion", 4, False),
            *pools,
            RoleSpec.from_dict(VERIFIER, _section(raw, "verifier", "spec"), "spec.verifier", 8, True),
        )
        spec = cls(
            name=name,
            roles=roles,
            autoscaling=Autoscaling.from_dict(_section(raw, "autoscaling", "spec")),
            image_repository=_str(image, "repository", "ghcr.io/specfleet/specfleet", "spec.image"),
            image_tag=_str(image, "tag", "0.1.0", "spec.image"),
            image_pull_policy=_str(image, "pullPolicy", "IfNotPresent", "spec.image",
                                   ("Always", "IfNotPresent", "Never")),
            image_digest=_digest(image),
            models_source=_str(models, "source", "image", "spec.models", ("image", "pvc")),
            models_path=_str(models, "path", "/models", "spec.models"),
            models_claim=_str(models, "claimName", "", "spec.models"),
            models_target=_folder(models["target"], "spec.models.target") if models.get("target") else "",
            models_drafters=drafters,
            models_head=head,
            models_dtype=_str(models, "dtype", "", "spec.models", DTYPES) if "dtype" in models else "",
            max_model_len=_int(models, "maxModelLen", 0, "spec.models", minimum=1) if "maxModelLen" in models else 0,
            kv_cache_memory=_kv_cache_memory(models),
            redis_mode=_str(redis, "mode", "inCluster", "spec.redis", ("inCluster", "external")),
            redis_url=_str(redis, "url", "", "spec.redis"),
            redis_secret=SecretRef(_str(secret, "name", "", "spec.redis.secretRef"),
                                   _str(secret, "key", "url", "spec.redis.secretRef")),
            token_secret=SecretRef(_str(token, "name", "", "spec.auth.tokenSecretRef"),
                                   _str(token, "key", "token", "spec.auth.tokenSecretRef")),
            otlp_endpoint=_str(_section(raw, "telemetry", "spec"), "otlpEndpoint", "", "spec.telemetry"),
            internal_tls_secret=_str(internal_tls, "secretName", "", "spec.tls.internal"),
            internal_tls_server_name=_str(internal_tls, "serverName", "", "spec.tls.internal"),
        )
        if spec.models_source == "pvc" and not spec.models_claim:
            raise SpecError("spec.models.source is pvc but spec.models.claimName is empty: name the PVC holding the "
                            "models, or use source: image")
        if not spec.models_path.startswith("/"):
            raise SpecError(f"spec.models.path must be an absolute path, got {spec.models_path!r}")
        if spec.redis_mode == "external" and not (spec.redis_url or spec.redis_secret.name):
            raise SpecError("spec.redis.mode is external but neither spec.redis.url nor spec.redis.secretRef.name is "
                            "set: give the Redis URL or the Secret that holds it")
        return spec


def _declared_pool(role: RoleSpec, drafters: Mapping[str, str], where: str) -> RoleSpec:
    """A pool of a fleet with spec.models.drafters: its name is a declared drafter (whose folder becomes the pool's
    model) or a model-free pool."""
    name = str(role.pool)
    if role.model:
        raise SpecError(f"{where}.model {role.model!r} is for the bundled layout; with spec.models.drafters a pool "
                        f"takes its drafter's folder from there by its name: remove {where}.model")
    if name in MODEL_FREE:
        return role
    if name not in drafters:
        raise SpecError(f"{where}.name {name!r} names no drafter of spec.models.drafters ({', '.join(drafters)}) "
                        f"and no model-free pool ({', '.join(MODEL_FREE)}): declare it there as {{name: {name}, "
                        "path: FOLDER}, or name the pool after a declared drafter")
    return dataclasses.replace(role, model=drafters[name])


def _head_pool(role: RoleSpec, head: str, where: str) -> RoleSpec:
    """The pool named `head`: it serves the draft head of spec.models.head, which the spec must name (in the bundled
    layout too: the operator cannot see whether the image or the volume holds models.path/head)."""
    if not head:
        raise SpecError(f"{where}.name {HEAD_POOL!r} is the draft head's pool, but spec.models.head is not set: set "
                        f"it to the head's folder under spec.models.path (head for the bundled layout's head/, where "
                        f"`specfleet train head` puts it), or remove the pool")
    if role.model:
        raise SpecError(f"{where}.model {role.model!r}: the {HEAD_POOL} pool serves spec.models.head "
                        f"({head}): remove {where}.model")
    return dataclasses.replace(role, model=head)
