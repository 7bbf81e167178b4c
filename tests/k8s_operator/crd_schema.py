"""Helpers that read the SpecFleet CRD the way the API server does: apply its defaults, validate with strict
field validation (unknown fields rejected) and evaluate its CEL rules (the small subset the CRD uses)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import yaml

CRD_PATH = Path(__file__).resolve().parents[2] / "deploy/helm/specfleet/crds/specfleet.io_specfleets.yaml"
FORBIDDEN_KEYWORDS = {"$ref", "definitions", "dependencies", "additionalItems", "patternProperties"}


def load_crd() -> dict:
    return yaml.safe_load(CRD_PATH.read_text())


def spec_schema() -> dict:
    """The openAPIV3Schema of the SpecFleet resource (root: apiVersion, kind, metadata, spec, status)."""
    return load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict, path: str = ""):
    """Every schema node with its path."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")


def apply_defaults(node: dict, value):
    """What the API server stores: defaults filled in, parents' `default: {}` first, then their children's."""
    if node.get("type") == "object" and isinstance(value, dict):
        for name, child in node.get("properties", {}).items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = apply_defaults(child, value[name])
        if isinstance(node.get("additionalProperties"), dict):
            for name in set(value) - set(node.get("properties", {})):
                value[name] = apply_defaults(node["additionalProperties"], value[name])
    elif node.get("type") == "array" and isinstance(value, list):
        value = [apply_defaults(node["items"], item) for item in value]
    return value


def strict_json_schema(node: dict) -> dict:
    """The schema as jsonschema sees it under strict field validation: an object that lists its properties and
    does not preserve unknown fields rejects any other field, as the API server does (kubectl's default)."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "default"}
    if "properties" in node:
        out["properties"] = {k: strict_json_schema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_json_schema(node["additionalProperties"])
    if "items" in node:
        out["items"] = strict_json_schema(node["items"])
    return out


class _Obj(dict):
    """A CEL `self` for the subset our rules use: field access, ==, !=, <=, &&, ||, string literals."""

    def __getattr__(self, name):
        value = self[name]
        return _Obj(value) if isinstance(value, dict) else value


def cel_errors(schema: dict, value) -> list[str]:
    """Messages of the x-kubernetes-validations rules that `value` (defaults applied) breaks."""
    errors = []
    for path, node in walk(schema):
        rules = node.get("x-kubernetes-validations", [])
        if not rules:
            continue
        for target in _values_at(value, path.strip(".").split(".") if path else []):
            for rule in rules:
                expression = rule["rule"].replace("&&", " and ").replace("||", " or ")
                assert re.fullmatch(r"[\w.'!=<> ]+", expression), f"rule outside the tested CEL subset: {rule}"
                if not eval(expression, {"__builtins__": {}}, {"self": _Obj(target)}):  # noqa: S307 (our own file)
                    errors.append(rule["message"])
    return errors


def _values_at(value, parts: list[str]):
    if not parts:
        yield value
        return
    head, rest = parts[0], parts[1:]
    if head.endswith("[]"):
        items = value if head == "[]" else (value or {}).get(head[:-2], [])
        for item in items if isinstance(items, list) else []:
            yield from _values_at(item, rest)
    elif isinstance(value, dict) and head in value:
        yield from _values_at(value[head], rest)


def validation_errors(schema: dict, resource: dict) -> list[str]:
    stored = apply_defaults(schema, copy.deepcopy(resource))
    validator = jsonschema.Draft4Validator(strict_json_schema(schema))
    return [e.message for e in validator.iter_errors(stored)] + cel_errors(schema, stored)
