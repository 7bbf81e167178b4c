"""The policy scan of issue 22: checkov (a separate install, `make scan`) over the rendered chart and the manifests
the operator generates for the chart's SpecFleet, for the default values and each example under examples/. Every
failed check must be fixed or skipped inline (a `checkov.io/skip-<check>` annotation with its reason): any failure
left is unexplained and fails the scan.

    python -m tests.deploy.policy_scan --checkov .checkov-venv/bin/checkov --output bench/policy-scan.json

Each value set is scanned on its own (one folder: the chart's objects and the operator's, in the release namespace
as kopf.adopt puts them), so checks that join objects, such as "a NetworkPolicy selects this pod", see the chart's
policies beside the operator's pods."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from .chart import COMBINATIONS, EXAMPLES, NAMESPACE, REPO_ROOT, render, template_output

# what `make scan` installs; the project's own venv never gets checkov (its dependencies clash with ours)
CHECKOV_VENV = REPO_ROOT / ".checkov-venv"
SCANNED = ("defaults", *EXAMPLES)


def find_checkov() -> str | None:
    """$CHECKOV, else `make scan`'s venv, else checkov on PATH; None when there is none."""
    for candidate in (os.environ.get("CHECKOV"), str(CHECKOV_VENV / "bin" / "checkov"), shutil.which("checkov")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def operator_manifests(chart_docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the operator applies for the chart's SpecFleet, in the release namespace (kopf.adopt sets it)."""
    from specfleet_operator.manifests import fleet_manifests
    from specfleet_operator.spec import FleetSpec

    fleet = next(d for d in chart_docs if d["kind"] == "SpecFleet")
    objects = fleet_manifests(FleetSpec.from_dict(fleet["metadata"]["name"], fleet["spec"]))
    for obj in objects:
        obj["metadata"]["namespace"] = fleet["metadata"].get("namespace", NAMESPACE)
    return objects


def write_inputs(folder: Path, name: str) -> None:
    """chart.yaml (as `helm template` prints it) and operator.yaml for one value set, in `folder`."""
    values = COMBINATIONS[name]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "chart.yaml").write_text(template_output(values))
    (folder / "operator.yaml").write_text(yaml.safe_dump_all(operator_manifests(render(values)), sort_keys=False))


def _checkov(checkov: str, folder: Path) -> list[dict[str, Any]]:
    """Every check result in `folder`, each as {check, name, resource, file, result, reason}."""
    proc = subprocess.run([checkov, "--directory", str(folder), "--framework", "kubernetes", "--output", "json",
                           "--compact", "--skip-download"], capture_output=True, text=True, check=False)
    if proc.returncode not in (0, 1) or not proc.stdout.strip().startswith(("{", "[")):
        raise RuntimeError(f"checkov failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    reports = json.loads(proc.stdout)
    results = []
    for report in reports if isinstance(reports, list) else [reports]:
        for outcome, key in (("passed", "passed_checks"), ("failed", "failed_checks"), ("skipped", "skipped_checks")):
            for check in report.get("results", {}).get(key, []):
                results.append({"check": check["check_id"], "name": check["check_name"],
                                "resource": check["resource"], "file": Path(check["file_path"]).name,
                                "result": outcome, "reason": (check.get("check_result") or {}).get(
                                    "suppress_comment", "") if outcome == "skipped" else ""})
    return results


def scan(checkov: str) -> dict[str, Any]:
    """Runs checkov over each value set; the summary bench/policy-scan.json holds."""
    sets = {}
    with tempfile.TemporaryDirectory(prefix="specfleet-scan-") as tmp:
        for name in SCANNED:
            folder = Path(tmp) / name
            write_inputs(folder, name)
            results = _checkov(checkov, folder)
            by_source = {}
            for source in ("chart.yaml", "operator.yaml"):
                mine = [r for r in results if r["file"] == source]
                by_source[source.removesuffix(".yaml")] = dict(Counter(r["result"] for r in mine))
            sets[name] = {
                "counts": dict(Counter(r["result"] for r in results)),
                "by_source": by_source,
                "failed": sorted(f"{r['check']} {r['resource']} ({r['file']}): {r['name']}"
                                 for r in results if r["result"] == "failed"),
                "skipped": sorted({(r["check"], r["resource"], r["reason"]) for r in results
                                   if r["result"] == "skipped"}),
            }
    reasons: dict[str, set[str]] = {}
    for data in sets.values():
        for check, _, reason in data["skipped"]:
            reasons.setdefault(check, set()).add(reason)
    version = subprocess.run([checkov, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "scanner": f"checkov {version}",
        "scanned": {name: "the chart rendered with " + ("its default values" if name == "defaults" else
                                                        f"examples/{EXAMPLES[name].name}") +
                    ", plus the operator's manifests for its SpecFleet" for name in SCANNED},
        "totals": dict(sum((Counter(data["counts"]) for data in sets.values()), Counter())),
        "unexplained_failures": sum(len(data["failed"]) for data in sets.values()),
        "skip_reasons": {check: sorted(texts) for check, texts in sorted(reasons.items())},
        "sets": {name: {**data, "skipped": [f"{c} {r}: {why}" for c, r, why in data["skipped"]]}
                 for name, data in sets.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkov", default=None, help="the checkov executable (default: $CHECKOV, .checkov-venv, "
                                                        "PATH)")
    parser.add_argument("--output", type=Path, default=None, help="write the JSON summary here")
    parser.add_argument("--keep", type=Path, default=None, help="also write the scanned manifests under this folder")
    args = parser.parse_args(argv)
    checkov = args.checkov or find_checkov()
    if not checkov:
        sys.exit("error: no checkov found: run `make scan` (it installs checkov into .checkov-venv), or give "
                 "--checkov PATH")
    if args.keep:
        for name in SCANNED:
            write_inputs(args.keep / name, name)
    summary = scan(checkov)
    text = json.dumps(summary, indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
    for name, data in summary["sets"].items():
        print(f"{name}: {data['counts']}  chart {data['by_source']['chart']}  "
              f"operator {data['by_source']['operator']}")
        for line in data["failed"]:
            print(f"  FAILED {line}")
    print(f"{summary['unexplained_failures']} unexplained failures; skipped checks: "
          + ", ".join(f"{check} ({'; '.join(why)})" for check, why in summary["skip_reasons"].items()))
    return 1 if summary["unexplained_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
