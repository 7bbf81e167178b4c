"""Models by path in a SpecFleet (issue 18): spec.models.target and spec.models.drafters ({name, path} under
models.path), pools named after a declared drafter, and dtype / maxModelLen / kvCacheMemory. Without them the
manifests are those of the bundled layout, unchanged; with them each role's arguments name the folders, and they
parse with the real `specfleet serve`. Bad names and paths are SpecErrors naming the field, and the CRD agrees."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import kubernetes_validate
import pytest

from specfleet.engine.models import DTYPES
from specfleet.engine.models import NAME as DRAFTER_NAME
from specfleet_operator.manifests import container_args, fleet_manifests
from specfleet_operator.spec import KV_CACHE_MEMORY, MODEL_FOLDER, FleetSpec, SpecError

from .crd_schema import spec_schema, validation_errors
from .test_crd import sample
from .test_manifests import VARIANTS, by_kind
from .test_spec import server_defaulted

VALUES_SCHEMA = Path(__file__).resolve().parents[2] / "deploy/helm/specfleet/values.schema.json"
BY_PATH = {
    "models": {"source": "pvc", "claimName": "llama", "target": "llama-3.1-8b",
               "drafters": [{"name": "one-b", "path": "llama-3.2-1b"}, {"name": "qwen", "path": "qwen/0.5b"}],
               "dtype": "bfloat16", "maxModelLen": 16384, "kvCacheMemory": "20GiB"},
    "drafters": [{"name": "one-b", "maxReplicas": 4}, {"name": "suffix", "gpu": False}],
}
NEW_FLAGS = {"--target", "--drafter", "--dtype", "--max-model-len", "--kv-cache-memory"}


def args_of(spec: FleetSpec) -> dict[str, list[str]]:
    return {role.key: container_args(spec, role) for role in spec.roles}


# ---- the bundled layout: nothing changes ----------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_without_models_by_path_no_role_gets_the_new_flags(variant):
    spec = FleetSpec.from_dict("demo", VARIANTS[variant])
    assert (spec.models_target, spec.models_drafters, spec.models_dtype, spec.max_model_len,
            spec.kv_cache_memory) == ("", (), "", 0, "")
    for key, args in args_of(spec).items():
        assert not NEW_FLAGS & set(args), key


def test_default_commands_are_the_bundled_ones():
    args = args_of(FleetSpec.from_dict("demo", {}))
    common = ["--host", "0.0.0.0", "--port", "50051"]
    assert args["drafter-python"] == ["serve", "drafter", *common, "--models", "/models", "--pool", "python",
                                      "--device", "cuda"]  # a model pod requests a GPU by default and runs on it
    assert args["verifier"] == ["serve", "verifier", *common, "--models", "/models", "--device", "cuda"]
    assert args["fusion"] == ["serve", "fusion", *common]
    assert args["router"][-8:] == ["--models", "/models", "--drafters", "python=demo-drafter-python:50051",
                                   "--verifiers", "demo-verifier:50051", "--fusion", "demo-fusion:50051"]


def test_empty_models_by_path_fields_are_the_bundled_layout():
    unset = {"drafters": [{"name": "python", "model": "drafter-python"}]}
    empty = {**unset, "models": {"target": "", "drafters": []}}
    assert fleet_manifests(FleetSpec.from_dict("demo", empty)) == fleet_manifests(FleetSpec.from_dict("demo", unset))


# ---- by path ---------------------------------------------------------------------------------------------------

def test_each_role_gets_the_folders_it_loads():
    args = args_of(FleetSpec.from_dict("demo", BY_PATH))
    target = ["--target", "/models/llama-3.1-8b"]
    weights = ["--dtype", "bfloat16", "--device", "cuda", "--max-model-len", "16384", "--kv-cache-memory", "20GiB"]
    assert args["drafter-one-b"][6:] == ["--models", "/models", "--pool", "one-b", *target,
                                         "--drafter", "one-b=/models/llama-3.2-1b", *weights]
    # model-free: the target only (it checks the folder at start), no weights, so no dtype or KV memory
    assert args["drafter-suffix"][6:] == ["--models", "/models", "--pool", "suffix", *target,
                                          "--max-model-len", "16384"]
    assert args["verifier"][6:] == ["--models", "/models", *target, *weights]
    # the router reads the target's tokenizer and refuses requests past --max-model-len; it holds no weights
    assert args["router"][-4:] == [*target, "--max-model-len", "16384"]
    assert "one-b=demo-drafter-one-b:50051,suffix=demo-drafter-suffix:50051" in args["router"]
    assert args["fusion"] == ["serve", "fusion", "--host", "0.0.0.0", "--port", "50051"]


def test_only_what_is_set_is_passed_and_paths_follow_models_path():
    spec = FleetSpec.from_dict("demo", {"models": {"path": "/data/models/", "drafters": [
        {"name": "tiny", "path": "drafters/tiny/"}]}, "drafters": [{"name": "tiny"}]})
    args = args_of(spec)
    assert args["drafter-tiny"][6:] == ["--models", "/data/models/", "--pool", "tiny",
                                        "--drafter", "tiny=/data/models/drafters/tiny", "--device", "cuda"]
    assert not NEW_FLAGS & set(args["verifier"]) and not NEW_FLAGS & set(args["router"])


def test_the_arguments_parse_with_the_real_serve_command():
    from specfleet.cli import serve

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers(dest="command"), argparse.HelpFormatter)
    args = args_of(FleetSpec.from_dict("demo", BY_PATH))
    pool = parser.parse_args(args["drafter-one-b"])
    assert (pool.pool, str(pool.target), pool.drafter) == ("one-b", "/models/llama-3.1-8b",
                                                           ["one-b=/models/llama-3.2-1b"])
    assert (pool.dtype, pool.max_model_len, pool.kv_cache_memory) == ("bfloat16", 16384, 20 << 30)
    router = parser.parse_args(args["router"])
    assert (str(router.target), router.max_model_len, router.drafter) == ("/models/llama-3.1-8b", 16384, [])
    assert parser.parse_args(args["verifier"]).kv_cache_memory == 20 << 30


def test_manifests_validate_and_the_pool_records_its_folder():
    spec = FleetSpec.from_dict("demo", BY_PATH)
    objects = fleet_manifests(spec)
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30", strict=True)
    maps = by_kind(objects, "ConfigMap")
    assert maps["demo-drafter-one-b"]["data"]["SPECFLEET_DRAFTER_MODEL"] == "llama-3.2-1b"
    assert maps["demo-drafter-suffix"]["data"]["SPECFLEET_DRAFTER_MODEL"] == ""
    mounts = by_kind(objects, "Deployment")["demo-drafter-one-b"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "llama", "readOnly": True}} in mounts


def test_a_changed_drafter_rolls_only_its_pool():
    before = FleetSpec.from_dict("demo", BY_PATH)
    changed = copy.deepcopy(BY_PATH)
    changed["models"]["drafters"][0]["path"] = "llama-3.2-1b-instruct"
    after = FleetSpec.from_dict("demo", changed)
    differ = {key for key, args in args_of(before).items() if args_of(after)[key] != args}
    assert differ == {"drafter-one-b"}


def test_python_defaults_equal_crd_defaults_by_path():
    assert FleetSpec.from_dict("demo", BY_PATH) == FleetSpec.from_dict("demo", server_defaulted(BY_PATH))


# ---- what is refused -------------------------------------------------------------------------------------------

def by_path(models: dict | None = None, pools: list | None = None) -> dict:
    spec = copy.deepcopy(BY_PATH)
    spec["models"].update(models or {})
    if pools is not None:
        spec["drafters"] = pools
    return spec


SPEC_ERRORS = {
    "pool naming an unknown drafter": (by_path(pools=[{"name": "python"}]),
                                       "spec.drafters[0].name 'python' names no drafter of spec.models.drafters "
                                       "(one-b, qwen)"),
    "pool with a bundled model folder": (by_path(pools=[{"name": "one-b", "model": "drafter-python"}]),
                                         "spec.drafters[0].model 'drafter-python' is for the bundled layout"),
    "drafter name not a DNS label": (by_path({"drafters": [{"name": "One_B", "path": "x"}]}),
                                     "spec.models.drafters[0].name must be a DNS label"),
    "drafter name too long": (by_path({"drafters": [{"name": "a" * 41, "path": "x"}]}),
                              "spec.models.drafters[0].name must be a DNS label"),
    "drafter named like a model-free pool": (by_path({"drafters": [{"name": "suffix", "path": "x"}]}),
                                             "other than the model-free pools suffix, ngram"),
    "duplicate drafter names": (by_path({"drafters": [{"name": "one-b", "path": "a"}, {"name": "one-b", "path": "b"}]}),
                                "spec.models.drafters[1].name 'one-b' is used by two drafters"),
    "drafter without a path": (by_path({"drafters": [{"name": "one-b"}]}),
                               "spec.models.drafters[0].path must be a folder under spec.models.path"),
    "absolute drafter path": (by_path({"drafters": [{"name": "one-b", "path": "/models/llama-3.2-1b"}]}),
                              "spec.models.drafters[0].path must be a folder under spec.models.path"),
    "drafter path climbing out": (by_path({"drafters": [{"name": "one-b", "path": "llama/../../etc"}]}),
                                  "without '..'"),
    "absolute target": (by_path({"target": "/llama-3.1-8b"}), "spec.models.target must be a folder under"),
    "target climbing out": (by_path({"target": "../llama-3.1-8b"}), "spec.models.target must be a folder under"),
    "drafters not a list": (by_path({"drafters": {"one-b": "llama-3.2-1b"}}), "spec.models.drafters must be a list"),
    "unknown dtype": (by_path({"dtype": "fp8"}), "spec.models.dtype must be one of auto, float32, bfloat16, float16"),
    "zero maxModelLen": (by_path({"maxModelLen": 0}), "spec.models.maxModelLen must be an integer >= 1"),
    "KV memory in petabytes": (by_path({"kvCacheMemory": "1PiB"}), "spec.models.kvCacheMemory must be a size"),
    "zero KV memory": (by_path({"kvCacheMemory": "0GiB"}), "spec.models.kvCacheMemory must be a size > 0"),
    "KV memory as a number": (by_path({"kvCacheMemory": 1 << 30}), "spec.models.kvCacheMemory must be a size"),
}


@pytest.mark.parametrize("case", sorted(SPEC_ERRORS))
def test_bad_models_by_path_name_the_field(case):
    spec, message = SPEC_ERRORS[case]
    with pytest.raises(SpecError) as raised:
        FleetSpec.from_dict("demo", spec)
    assert message in str(raised.value)


def test_model_free_pools_and_the_target_alone_need_no_declared_drafter():
    spec = FleetSpec.from_dict("demo", {"models": {"target": "llama-3.1-8b"},
                                        "drafters": [{"name": "python", "model": "drafter-python"}]})
    # the bundled layout for the pool (models.path/drafter-python), checked against the given target
    assert args_of(spec)["drafter-python"][6:] == ["--models", "/models", "--pool", "python",
                                                   "--target", "/models/llama-3.1-8b", "--device", "cuda"]
    only_free = by_path(pools=[{"name": "suffix"}, {"name": "ngram"}])
    assert [pool.pool for pool in FleetSpec.from_dict("demo", only_free).pools] == ["suffix", "ngram"]


# ---- the CRD says the same --------------------------------------------------------------------------------------

def test_crd_and_chart_patterns_are_the_operators():
    crd = spec_schema()["properties"]["spec"]["properties"]["models"]["properties"]
    chart = json.loads(VALUES_SCHEMA.read_text())["properties"]["models"]["properties"]
    for models in (crd, chart):
        assert models["target"]["pattern"] == MODEL_FOLDER.pattern
        assert models["drafters"]["items"]["properties"]["path"]["pattern"] == MODEL_FOLDER.pattern
        assert models["drafters"]["items"]["properties"]["name"]["pattern"] == DRAFTER_NAME.pattern
        assert models["kvCacheMemory"]["pattern"] == KV_CACHE_MEMORY.pattern
        assert models["dtype"]["enum"] == list(DTYPES)
    assert not {"target", "drafters", "dtype", "maxModelLen", "kvCacheMemory"} & {
        name for name, node in crd.items() if "default" in node}, "unset must mean: the services' default"


@pytest.mark.parametrize("text", ["4GiB", "512MiB", "1.5GB", "1000000", " 2 gib ", "3kb", "7T", ".5g", "4Gi", "4 GiB B",
                                  "lots", "", "-1GiB", "1e9", "4PiB"])
def test_kv_cache_memory_pattern_agrees_with_the_cli(text):
    from specfleet.cli.options import byte_size

    try:
        byte_size(text)
        cli_accepts = True
    except argparse.ArgumentTypeError:
        cli_accepts = False
    assert bool(KV_CACHE_MEMORY.fullmatch(text)) == cli_accepts


def test_crd_accepts_models_by_path():
    assert validation_errors(spec_schema(), sample(BY_PATH)) == []


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ({"target": "/abs"}, "does not match"),
        ({"target": "a/../b"}, "does not match"),
        ({"drafters": [{"name": "one-b", "path": ".."}]}, "does not match"),
        ({"drafters": [{"name": "One-B", "path": "x"}]}, "does not match"),
        ({"drafters": [{"name": "one-b"}]}, "'path' is a required property"),
        ({"drafters": [{"name": "ngram", "path": "x"}]}, "suffix and ngram are the model-free pools"),
        ({"drafters": [{"name": "one-b", "path": "x", "dtype": "bfloat16"}]}, "Additional properties"),
        ({"dtype": "fp8"}, "is not one of"),
        ({"maxModelLen": 0}, "less than the minimum"),
        ({"kvCacheMemory": "4PiB"}, "does not match"),
    ],
)
def test_crd_rejects_bad_models_by_path(models, expected):
    errors = validation_errors(spec_schema(), sample({"models": models}))
    assert any(expected in e for e in errors), errors
