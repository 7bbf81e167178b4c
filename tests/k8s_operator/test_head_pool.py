"""The draft head as a drafter pool on Kubernetes (issue 20): spec.models.head (a folder under models.path, in the
bundled layout or by path) and a pool named `head`, which is refused without it. With a head the router, the
verifier and the head pool get `--head PATH` (the verifier then keeps features; the router asks for them because
`head` is among its --drafters), the head pool is a model pod (dtype and KV options, GPU, the models volume), and
the other pools are left as they were. The arguments parse with the real `specfleet serve`; the CRD agrees."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import kubernetes_validate
import pytest

from specfleet_operator.manifests import container_args, fleet_manifests
from specfleet_operator.spec import HEAD_POOL, MODEL_FOLDER, FleetSpec, SpecError

from .crd_schema import spec_schema, validation_errors
from .test_crd import sample
from .test_manifests import VARIANTS, by_kind
from .test_spec import server_defaulted

VALUES_SCHEMA = Path(__file__).resolve().parents[2] / "deploy/helm/specfleet/values.schema.json"
BUNDLED = {
    "models": {"head": "head"},
    "drafters": [{"name": "head", "maxReplicas": 4}, {"name": "python", "model": "drafter-python"},
                 {"name": "suffix", "gpu": False}],
}
BY_PATH = {
    "models": {"source": "pvc", "claimName": "llama", "target": "llama-3.1-8b", "head": "heads/llama-3.1-8b",
               "drafters": [{"name": "one-b", "path": "llama-3.2-1b"}],
               "dtype": "bfloat16", "maxModelLen": 16384, "kvCacheMemory": "20GiB"},
    "drafters": [{"name": "head"}, {"name": "one-b"}, {"name": "suffix", "gpu": False}],
}


def args_of(spec: FleetSpec) -> dict[str, list[str]]:
    return {role.key: container_args(spec, role) for role in spec.roles}


def serve_parser() -> argparse.ArgumentParser:
    from specfleet.cli import serve

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers(dest="command"), argparse.HelpFormatter)
    return parser


def test_the_pool_name_is_the_services():
    from specfleet.drafter.serve import HEAD_POOL as SERVED
    from specfleet.engine.head import HEAD

    assert HEAD_POOL == HEAD == SERVED == "head"


# ---- the spec --------------------------------------------------------------------------------------------------

def test_a_head_pool_in_the_bundled_layout():
    spec = FleetSpec.from_dict("demo", BUNDLED)
    assert (spec.models_head, spec.has_head, spec.models_target, spec.models_drafters) == ("head", True, "", ())
    pool = spec.role("drafter-head")
    assert (pool.pool, pool.model, pool.max_replicas, pool.gpu) == ("head", "head", 4, True)
    assert spec.role("drafter-python").model == "drafter-python"


def test_a_head_pool_by_path():
    spec = FleetSpec.from_dict("demo", BY_PATH)
    assert spec.models_head == "heads/llama-3.1-8b"
    assert [(p.pool, p.model) for p in spec.pools] == [("head", "heads/llama-3.1-8b"), ("one-b", "llama-3.2-1b"),
                                                        ("suffix", "")]


def test_no_head_by_default_and_empty_means_none():
    assert FleetSpec.from_dict("demo", {}).models_head == ""
    assert not FleetSpec.from_dict("demo", {"models": {"head": ""}}).has_head
    assert FleetSpec.from_dict("demo", {"models": {"head": "heads/h/"}}).models_head == "heads/h"


@pytest.mark.parametrize("spec", [BUNDLED, BY_PATH])
def test_python_defaults_equal_crd_defaults_with_a_head(spec):
    assert FleetSpec.from_dict("demo", spec) == FleetSpec.from_dict("demo", server_defaulted(spec))


def with_models(base: dict, models: dict | None = None, pools: list | None = None) -> dict:
    spec = copy.deepcopy(base)
    spec["models"].update(models or {})
    if pools is not None:
        spec["drafters"] = pools
    return spec


NO_HEAD = "spec.drafters[0].name 'head' is the draft head's pool, but spec.models.head is not set: set it to the " \
          "head's folder under spec.models.path (head for the bundled layout's head/"
SPEC_ERRORS = {
    "head pool without a head, bundled": ({"drafters": [{"name": "head"}]}, NO_HEAD),
    "head pool with an empty head": ({"models": {"head": ""}, "drafters": [{"name": "head"}]}, NO_HEAD),
    "head pool without a head, by path": (with_models(BY_PATH, {"head": None}), NO_HEAD),
    "head pool with a model, bundled": (with_models(BUNDLED, pools=[{"name": "head", "model": "head"}]),
                                        "spec.drafters[0].model 'head': the head pool serves spec.models.head (head): "
                                        "remove spec.drafters[0].model"),
    "head pool with a model, by path": (with_models(BY_PATH, pools=[{"name": "one-b"}, {"name": "head",
                                                                                         "model": "x"}]),
                                        "spec.drafters[1].model 'x': the head pool serves spec.models.head"),
    "absolute head": (with_models(BUNDLED, {"head": "/models/head"}),
                      "spec.models.head must be a folder under spec.models.path, relative to it and without '..'"),
    "head climbing out": (with_models(BUNDLED, {"head": "heads/../../etc"}), "spec.models.head must be a folder"),
    "head not a string": (with_models(BUNDLED, {"head": ["head"]}), "spec.models.head must be a folder"),
    "a drafter named head": (with_models(BY_PATH, {"drafters": [{"name": "head", "path": "llama-3.2-1b"}]}),
                             "spec.models.drafters[0].name must be a DNS label of at most 40 characters (lower-case "
                             "letters, digits, '-') other than the model-free pools suffix, ngram and head (a draft "
                             "head is given as spec.models.head), got 'head'"),
    "duplicate head pools": (with_models(BUNDLED, pools=[{"name": "head"}, {"name": "head"}]),
                             "spec.drafters[1].name 'head' is used by two pools"),
}


@pytest.mark.parametrize("case", sorted(SPEC_ERRORS))
def test_bad_heads_name_the_field_and_the_fix(case):
    spec, message = SPEC_ERRORS[case]
    with pytest.raises(SpecError) as raised:
        FleetSpec.from_dict("demo", spec)
    assert message in str(raised.value)


# ---- the manifests ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_without_a_head_no_role_gets_head(variant):
    for key, args in args_of(FleetSpec.from_dict("demo", VARIANTS[variant])).items():
        assert "--head" not in args, key


def test_bundled_head_args():
    args = args_of(FleetSpec.from_dict("demo", BUNDLED))
    head = ["--head", "/models/head"]
    gpu = ["--device", "cuda"]  # model pods request a GPU by default (the CRD) and run on it
    assert args["drafter-head"][6:] == ["--models", "/models", "--pool", "head", *head, *gpu]
    assert args["verifier"][6:] == ["--models", "/models", *head, *gpu]
    assert args["router"][-2:] == head
    assert "head=demo-drafter-head:50051,python=demo-drafter-python:50051,suffix=demo-drafter-suffix:50051" in \
        args["router"]
    # the other pools never read the head
    assert args["drafter-python"][6:] == ["--models", "/models", "--pool", "python", *gpu]
    assert args["drafter-suffix"][6:] == ["--models", "/models", "--pool", "suffix"]  # model-free: no device
    assert args["fusion"] == ["serve", "fusion", "--host", "0.0.0.0", "--port", "50051"]


def test_by_path_head_args_the_head_pool_is_a_model_pod():
    args = args_of(FleetSpec.from_dict("demo", BY_PATH))
    target, head = ["--target", "/models/llama-3.1-8b"], ["--head", "/models/heads/llama-3.1-8b"]
    weights = ["--dtype", "bfloat16", "--device", "cuda", "--max-model-len", "16384", "--kv-cache-memory", "20GiB"]
    assert args["drafter-head"][6:] == ["--models", "/models", "--pool", "head", *target, *head, *weights]
    assert args["verifier"][6:] == ["--models", "/models", *target, *head, *weights]
    assert args["router"][-6:] == [*target, *head, "--max-model-len", "16384"]
    assert args["drafter-one-b"][6:] == ["--models", "/models", "--pool", "one-b", *target,
                                         "--drafter", "one-b=/models/llama-3.2-1b", *weights]
    assert args["drafter-suffix"][6:] == ["--models", "/models", "--pool", "suffix", *target,
                                          "--max-model-len", "16384"]


def test_a_head_without_a_head_pool_still_reaches_router_and_verifier():
    # the model set has a head, as with `specfleet up --head`: the verifier keeps features; no pool asks for them
    args = args_of(FleetSpec.from_dict("demo", {"models": {"head": "head"}}))
    assert args["verifier"][-4:-2] == args["router"][-2:] == ["--head", "/models/head"]
    assert args["verifier"][-2:] == ["--device", "cuda"]
    assert "--head" not in args["drafter-python"]


@pytest.mark.parametrize("raw", [BUNDLED, BY_PATH])
def test_the_arguments_parse_with_the_real_serve_command(raw):
    parser = serve_parser()
    args = args_of(FleetSpec.from_dict("demo", raw))
    folder = FleetSpec.from_dict("demo", raw).model_path(raw["models"]["head"])
    pool = parser.parse_args(args["drafter-head"])
    assert (pool.role, pool.pool, str(pool.head)) == ("drafter", "head", folder)
    assert str(parser.parse_args(args["verifier"]).head) == folder
    router = parser.parse_args(args["router"])
    assert str(router.head) == folder and "head=demo-drafter-head:50051" in router.drafters
    assert parser.parse_args(args["drafter-suffix"]).head is None


def test_head_pool_manifests_validate_and_get_a_model_pods_resources_and_volumes():
    spec = FleetSpec.from_dict("demo", BY_PATH)
    objects = fleet_manifests(spec)
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30", strict=True)
    maps, deployments = by_kind(objects, "ConfigMap"), by_kind(objects, "Deployment")
    assert maps["demo-drafter-head"]["data"]["SPECFLEET_DRAFTER_MODEL"] == "heads/llama-3.1-8b"
    assert maps["demo-drafter-head"]["data"]["SPECFLEET_POOL"] == "head"
    pod = deployments["demo-drafter-head"]["spec"]["template"]["spec"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "llama", "readOnly": True}} in pod["volumes"]
    container = pod["containers"][0]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert deployments["demo-drafter-head"]["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 1,
                                                                                     "maxSurge": 0}
    assert deployments["demo-drafter-head"]["metadata"]["labels"]["specfleet.io/pool"] == "head"
    assert {"demo-drafter-head", "demo-drafter-one-b", "demo-drafter-suffix"} <= set(by_kind(objects, "Service"))


def test_a_changed_head_rolls_router_verifier_and_head_pool_only():
    before = FleetSpec.from_dict("demo", BY_PATH)
    after = FleetSpec.from_dict("demo", with_models(BY_PATH, {"head": "heads/llama-3.1-8b-v2"}))
    differ = {key for key, args in args_of(before).items() if args_of(after)[key] != args}
    assert differ == {"router", "verifier", "drafter-head"}


# ---- the CRD and the chart's schema say the same ---------------------------------------------------------------

def test_crd_and_chart_head_patterns_are_the_operators():
    crd = spec_schema()["properties"]["spec"]["properties"]["models"]["properties"]
    chart = json.loads(VALUES_SCHEMA.read_text())["properties"]["models"]["properties"]
    for models in (crd, chart):
        assert models["head"]["pattern"] == MODEL_FOLDER.pattern
        assert "default" not in models["head"], "unset must mean: no head"
    assert "head" in chart["drafters"]["items"]["properties"]["name"]["not"]["enum"]


@pytest.mark.parametrize("raw", [BUNDLED, BY_PATH])
def test_crd_accepts_a_head(raw):
    assert validation_errors(spec_schema(), sample(raw)) == []


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ({"head": "/models/head"}, "does not match"),
        ({"head": "a/../b"}, "does not match"),
        ({"head": 3}, "is not of type 'string'"),
        ({"drafters": [{"name": "head", "path": "x"}]}, "head is the draft head's pool"),
    ],
)
def test_crd_rejects_bad_heads(models, expected):
    errors = validation_errors(spec_schema(), sample({"models": models}))
    assert any(expected in e for e in errors), errors
