"""The corpus builder reads only allowed sources, drops held-out packages (vendored copies too), dedupes and
splits deterministically."""

import json
from pathlib import Path

import pytest

from specfleet.training import corpus
from specfleet.training.corpus import build_corpus, is_held_out, source_roots

LONG_DOC = "This paragraph explains the behaviour in detail. " * 10


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def fake_site(tmp_path):
    site = tmp_path / "site-packages"
    _write(site, "goodpkg/__init__.py", f'"""{LONG_DOC}"""\n\ndef f(x):\n    return x + 1\n')
    _write(site, "goodpkg/copy.py", f'"""{LONG_DOC}"""\n\ndef f(x):\n    return x + 1\n')  # duplicate
    _write(site, "goodpkg/include/thing.h", "#pragma once\nint thing(void);\n")
    _write(site, "goodpkg/README.md", "# goodpkg\n\n" + LONG_DOC)
    _write(site, "goodpkg-1.0.dist-info/METADATA", "Name: goodpkg\nVersion: 1.0\n\n" + LONG_DOC + " metadata")
    # Held-out packages, their metadata, and vendored copies must never be read.
    _write(site, "requests/sessions.py", "SECRET_REQUESTS = 1\n")
    _write(site, "urllib3/util/retry.py", "SECRET_URLLIB3 = 1\n")
    _write(site, "yaml/__init__.py", "SECRET_YAML = 1\n")
    _write(site, "_yaml/__init__.py", "SECRET_CYAML = 1\n")
    _write(site, "jwt/api_jwt.py", "SECRET_JWT = 1\n")
    _write(site, "pygments/lexer.py", "SECRET_PYGMENTS = 1\n")
    _write(site, "pip/_vendor/requests/api.py", "SECRET_VENDORED = 1\n")
    _write(site, "pip/_vendor/pygments/README.md", "SECRET_VENDORED_DOC " + LONG_DOC)
    _write(site, "PyYAML-6.0.2.dist-info/METADATA", "Name: PyYAML\n\nSECRET_META " + LONG_DOC)
    _write(site, "requests-2.32.3.dist-info/METADATA", "Name: requests\n\nSECRET_META2 " + LONG_DOC)
    _write(site, "PyJWT-2.9.0.dist-info/METADATA", "Name: PyJWT\n\nSECRET_META3 " + LONG_DOC)
    return site


def _all_text(out: Path) -> str:
    return "".join(p.read_text() for p in sorted(out.glob("*.jsonl")))


def test_held_out_sources_are_excluded(fake_site, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "_pydoc_topics", lambda: iter(()))
    out = tmp_path / "corpus"
    stats = build_corpus(out, roots=[fake_site])
    text = _all_text(out)
    assert "SECRET" not in text
    assert stats.held_out_skipped == 11
    assert "def f(x)" in text and "int thing(void)" in text and "metadata" in text


def test_domains_dedup_and_manifest(fake_site, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "_pydoc_topics", lambda: iter(()))
    out = tmp_path / "corpus"
    stats = build_corpus(out, roots=[fake_site])
    docs = {d: sum(stats.documents[d].values()) for d in corpus.DOMAINS}
    # one .py (its copy is a duplicate), one header; prose = README + METADATA + the docstring (deduped too)
    assert docs == {"python": 1, "c": 1, "prose": 3}
    assert stats.duplicates_dropped == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["held_out_packages"] == sorted(corpus.HELD_OUT)


def test_build_is_deterministic(fake_site, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "_pydoc_topics", lambda: iter(()))
    build_corpus(tmp_path / "a", roots=[fake_site])
    build_corpus(tmp_path / "b", roots=[fake_site])
    for f in (tmp_path / "a").glob("*.jsonl"):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


@pytest.mark.parametrize("path,held", [
    ("requests/api.py", True),
    ("pip/_vendor/urllib3/poolmanager.py", True),
    ("yaml/reader.py", True),
    ("_yaml/__init__.py", True),
    ("jwt.py", True),
    ("PyYAML-6.0.2.dist-info/METADATA", True),
    ("pyjwt-2.9.0.dist-info/METADATA", True),
    ("types_requests-2.0.dist-info/METADATA", True),
    ("requests_toolbelt/adapters.py", False),
    ("pyyaml_include/x.py", False),
    ("torch/include/ATen/Tensor.h", False),
])
def test_is_held_out(path, held):
    assert is_held_out(Path(path)) is held


def test_roots_are_the_python_installation_and_the_venv():
    import sys

    allowed = (Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve())
    for root in source_roots():
        assert any(root == a or a in root.parents for a in allowed), root
        assert not str(root).startswith(("/usr/share/doc", "/usr/include"))
