"""`specfleet operator run` (the kopf operator; peering name `specfleet`, liveness on :8080/healthz) and
`specfleet operator manifests` (print the objects the operator would create for a SpecFleet file, no cluster)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _default_namespace() -> str:
    """The namespace the operator pod runs in, else `default` (a developer's kubeconfig)."""
    if SERVICE_ACCOUNT_NAMESPACE.exists():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    return "default"


def cmd_run(args: argparse.Namespace) -> int:
    import kopf

    from specfleet_operator.handlers import make_registry

    if args.all_namespaces and args.namespace:
        sys.exit("error: give --namespace or --all-namespaces, not both")
    namespaces = args.namespace or ([] if args.all_namespaces else [_default_namespace()])
    kopf.configure(verbose=args.verbose)
    settings = kopf.OperatorSettings()
    # watch exactly the namespaces given: no cluster-wide listing of namespaces and CRDs, which a namespaced Role
    # does not allow anyway
    settings.scanning.disabled = not args.all_namespaces
    kopf.run(registry=make_registry(autoscale_interval_s=args.interval), settings=settings,
             standalone=args.standalone, peering_name=args.peering, clusterwide=args.all_namespaces,
             namespaces=namespaces, liveness_endpoint=args.liveness)
    return 0


def cmd_manifests(args: argparse.Namespace) -> int:
    import yaml

    from specfleet_operator.manifests import fleet_manifests
    from specfleet_operator.spec import FleetSpec, SpecError

    try:
        resource = yaml.safe_load(Path(args.file).read_text())
        if not isinstance(resource, dict) or resource.get("kind") != "SpecFleet":
            sys.exit(f"error: {args.file} holds no SpecFleet resource (kind: SpecFleet)")
        name = resource.get("metadata", {}).get("name") or "specfleet"
        objects = fleet_manifests(FleetSpec.from_dict(name, resource.get("spec")))
    except (OSError, yaml.YAMLError, SpecError) as exc:
        sys.exit(f"error: {exc}")
    if args.output == "json":
        print(json.dumps(objects, indent=2))
    else:
        print(yaml.safe_dump_all(objects, sort_keys=False), end="")
    return 0


def add_parsers(sub, fmt) -> None:
    p = sub.add_parser("operator", formatter_class=fmt, help="the Kubernetes operator for SpecFleet resources")
    osub = p.add_subparsers(dest="operator_command", metavar="ACTION", required=True)
    r = osub.add_parser("run", formatter_class=fmt, help="run the operator (kopf) against the current cluster",
                        description="Watches SpecFleet resources; creates and owns each role's Deployment, Service "
                                    "and ConfigMap, autoscales them from Redis heartbeats and queue metrics, and "
                                    "keeps .status and events up to date. Logs in with the pod's service account "
                                    "or a kubeconfig.")
    r.add_argument("--namespace", action="append", default=[],
                   help="namespace to watch (repeatable; default: the operator pod's own, else default)")
    r.add_argument("--all-namespaces", action="store_true", help="watch every namespace (needs a ClusterRole)")
    r.add_argument("--standalone", action="store_true",
                   help="no peering: run even if another operator is active (development only)")
    r.add_argument("--peering", default="specfleet", help="KopfPeering name: one operator instance acts at a time")
    r.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL")
    r.add_argument("--interval", type=float, default=float(os.environ.get("SPECFLEET_AUTOSCALE_INTERVAL_S", 10)),
                   help="seconds between autoscaling steps (env SPECFLEET_AUTOSCALE_INTERVAL_S)")
    r.add_argument("--verbose", action="store_true", help="debug logging")
    r.set_defaults(func=cmd_run)
    m = osub.add_parser("manifests", formatter_class=fmt,
                        help="print the objects the operator would create for a SpecFleet YAML file")
    m.add_argument("file", help="a YAML file with one SpecFleet resource")
    m.add_argument("--output", choices=("yaml", "json"), default="yaml", help="output format")
    m.set_defaults(func=cmd_manifests)
