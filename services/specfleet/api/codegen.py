"""Generates the checked-in Python stubs in specfleet/api/v1/ from protos/ (`make protos`); the test suite
regenerates them into a temporary folder and fails when they drift from the checked-in files."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO_ROOT / "protos"
STUB_ROOT = REPO_ROOT / "services"  # stubs land in services/specfleet/api/v1/, importable as specfleet.api.v1


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "specfleet" / "api" / "v1").glob("*.proto"))


def generate(out_root: Path = STUB_ROOT) -> list[Path]:
    """Runs protoc (from grpcio-tools) on every .proto; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    out = Path(out_root)
    (out / "specfleet" / "api" / "v1").mkdir(parents=True, exist_ok=True)
    code = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                        f"--grpc_python_out={out}", *protos])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return sorted(p for p in (out / "specfleet" / "api" / "v1").iterdir() if p.name.endswith((".py", ".pyi"))
                  and p.name != "__init__.py")


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(REPO_ROOT))
    sys.exit(0)
