"""The checked-in stubs in specfleet/api/v1/ are exactly what protoc generates from protos/ (run `make protos`),
and the public proto stands alone (imports nothing beyond protobuf's well-known types)."""

import re

from specfleet.api.codegen import PROTO_ROOT, STUB_ROOT, generate, proto_files


def test_generated_stubs_match_the_protos(tmp_path):
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        checked_in = STUB_ROOT / path.relative_to(tmp_path)
        assert checked_in.exists(), f"{checked_in} is missing: run `make protos`"
        assert checked_in.read_bytes() == path.read_bytes(), f"{checked_in} drifted from protos/: run `make protos`"


def test_protos_import_only_well_known_types():
    for proto in proto_files():
        for line in proto.read_text().splitlines():
            match = re.match(r'\s*import\s+(?:public\s+)?"([^"]+)"', line)
            if match:
                assert match.group(1).startswith("google/protobuf/"), f"{proto.relative_to(PROTO_ROOT)}: {line}"
