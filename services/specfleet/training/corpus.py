"""Builds the three-domain training corpora (python, prose, c) from the Python installation and the venv.

Only the interpreter's own stdlib/include directories and the active environment's site-packages are read,
never the operating system's documentation or header directories. The packages in HELD_OUT (and vendored
copies of them, e.g. pip/_vendor/requests) are never read: they are kept for evaluation and benchmarks.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

DOMAINS = ("python", "prose", "c")

# Import names of the held-out packages, and the distribution names they install under.
HELD_OUT = frozenset({"pygments", "yaml", "_yaml", "jwt", "requests", "urllib3"})
HELD_OUT_DISTS = frozenset({"pygments", "pyyaml", "pyjwt", "requests", "urllib3", "types-requests", "types-pyyaml"})

C_SUFFIXES = frozenset({".h", ".hh", ".hpp", ".hxx", ".c", ".cc", ".cpp", ".cxx", ".cu", ".cuh", ".inl"})
PROSE_SUFFIXES = frozenset({".md", ".rst"})
MAX_FILE_BYTES = 400_000
MIN_DOCSTRING_CHARS = 300
VALIDATION_PERCENT = 3  # share of documents (by content hash) kept for validation


@dataclass
class CorpusStats:
    """What a build read and kept, written beside the corpus as manifest.json."""

    roots: list[str]
    documents: dict[str, dict[str, int]] = field(default_factory=dict)
    chars: dict[str, dict[str, int]] = field(default_factory=dict)
    duplicates_dropped: int = 0
    held_out_skipped: int = 0


def source_roots() -> list[Path]:
    """The directories text is taken from: the interpreter's stdlib and headers, and this environment's packages."""
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"], paths["include"], paths["purelib"], paths["platlib"]]
    seen: list[Path] = []
    for root in roots:
        p = Path(root).resolve()
        if p.is_dir() and p not in seen:
            seen.append(p)
    return seen


def is_held_out(path: Path) -> bool:
    """True when any component of the path is a held-out package (or its dist-info), vendored copies included."""
    for part in path.parts:
        low = part.lower()
        if low in HELD_OUT or low.removesuffix(".py") in HELD_OUT:
            return True
        if low.endswith((".dist-info", ".egg-info")):
            dist = re.split(r"-\d", low, maxsplit=1)[0].replace("_", "-")
            if dist in HELD_OUT_DISTS:
                return True
    return False


def _walk(root: Path, skip_dirs: set[Path]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() not in skip_dirs and d != "__pycache__")
        for name in sorted(filenames):
            yield here / name


def _read_text(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if "\x00" in text:
        return None
    return text


def _docstrings(source: str) -> Iterator[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                yield doc


def _metadata_description(text: str) -> str | None:
    # The long description is the body after the first blank line of a METADATA file.
    _, sep, body = text.partition("\n\n")
    body = body.strip()
    return body if sep and len(body) >= MIN_DOCSTRING_CHARS else None


def _pydoc_topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics  # the stdlib's own help texts
    except ImportError:
        return
    for key in sorted(topics):
        yield topics[key]


def iter_documents(roots: list[Path], stats: CorpusStats) -> Iterator[tuple[str, str, str]]:
    """Yields (domain, source, text) for every candidate document under the roots, held-out sources excluded."""
    skip = {r for r in roots}
    for root in roots:
        # Nested roots (site-packages inside stdlib) are walked on their own turn, not twice; the base
        # interpreter's own site-packages is not this environment's and is never read.
        nested = {r for r in skip if r != root and root in r.parents}
        nested.add((root / "site-packages").resolve())
        for path in _walk(root, nested):
            rel = path.relative_to(root)
            if is_held_out(rel):
                stats.held_out_skipped += 1
                continue
            suffix = path.suffix.lower()
            if suffix == ".py":
                text = _read_text(path)
                if text is None:
                    continue
                yield "python", str(path), text
                for doc in _docstrings(text):
                    yield "prose", f"{path}#docstring", doc
            elif suffix in C_SUFFIXES:
                text = _read_text(path)
                if text is not None:
                    yield "c", str(path), text
            elif suffix in PROSE_SUFFIXES:
                text = _read_text(path)
                if text is not None:
                    yield "prose", str(path), text
            elif path.name == "METADATA" and path.parent.name.endswith(".dist-info"):
                text = _read_text(path)
                desc = _metadata_description(text) if text else None
                if desc:
                    yield "prose", str(path), desc
    for i, topic in enumerate(_pydoc_topics()):
        yield "prose", f"pydoc_data.topics[{i}]", topic


def _content_key(text: str) -> str:
    normalised = "\n".join(line.rstrip() for line in text.strip().splitlines())
    return hashlib.sha256(normalised.encode("utf-8")).hexdigest()


def build_corpus(out_dir: Path, max_mb_per_domain: float = 30.0, roots: list[Path] | None = None) -> CorpusStats:
    """Writes out_dir/{domain}.{train,val}.jsonl and manifest.json; deterministic for a given environment.

    Documents are deduplicated by normalised content, split by content hash (so the split never depends on
    file order or machine), and capped per domain in hash order (a fixed pseudo-random sample).
    """
    roots = roots if roots is not None else source_roots()
    stats = CorpusStats(roots=[str(r) for r in roots])
    by_domain: dict[str, dict[str, tuple[str, str]]] = {d: {} for d in DOMAINS}
    seen: set[str] = set()
    for domain, source, text in tqdm(iter_documents(roots, stats), desc="scanning sources", unit=" docs"):
        key = _content_key(text)
        if key in seen:
            stats.duplicates_dropped += 1
            continue
        seen.add(key)
        by_domain[domain][key] = (source, text.strip() + "\n")

    out_dir.mkdir(parents=True, exist_ok=True)
    cap = int(max_mb_per_domain * 1_000_000)
    for domain in DOMAINS:
        files = {split: open(out_dir / f"{domain}.{split}.jsonl", "w", encoding="utf-8") for split in ("train", "val")}
        counts = {"train": 0, "val": 0}
        chars = {"train": 0, "val": 0}
        try:
            for key in sorted(by_domain[domain]):
                source, text = by_domain[domain][key]
                split = "val" if int(key[:8], 16) % 100 < VALIDATION_PERCENT else "train"
                if chars["train"] + chars["val"] >= cap:
                    break
                files[split].write(json.dumps({"source": source, "sha256": key, "text": text}) + "\n")
                counts[split] += 1
                chars[split] += len(text)
        finally:
            for f in files.values():
                f.close()
        stats.documents[domain] = counts
        stats.chars[domain] = chars
    manifest = {
        "python": sys.version,
        "roots": stats.roots,
        "held_out_packages": sorted(HELD_OUT),
        "validation_percent": VALIDATION_PERCENT,
        "max_mb_per_domain": max_mb_per_domain,
        "documents": stats.documents,
        "chars": stats.chars,
        "duplicates_dropped": stats.duplicates_dropped,
        "held_out_files_skipped": stats.held_out_skipped,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return stats


def read_documents(corpus_dir: Path, domain: str, split: str) -> Iterator[str]:
    """The texts of one domain's split, in file order."""
    with open(corpus_dir / f"{domain}.{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
