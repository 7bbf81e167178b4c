"""Held-out prompts for tests and benchmarks, never from any training split: Python code and long docstrings from
the packages the corpus excludes (requests, urllib3, yaml, jwt, pygments) and hand-written C snippets."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

HELD_OUT_PACKAGES = ("requests", "urllib3", "yaml", "jwt", "pygments")

# Written for this prompt set (the corpus only has C from installed packages' headers and sources).
C_PROMPTS = (
    "#include <stdio.h>\n#include <stdlib.h>\n\nint main(int argc, char **argv)\n{\n    if (argc < 2) {\n",
    "static int compare_ints(const void *a, const void *b)\n{\n    const int *x = a;\n",
    "struct ring_buffer {\n    size_t head;\n    size_t tail;\n    size_t capacity;\n",
    "/* Returns the number of bytes written, or -1 on error. */\n"
    "ssize_t write_all(int fd, const char *buf, size_t n)\n{\n",
    "#ifndef QUEUE_H\n#define QUEUE_H\n\n#include <stddef.h>\n\ntypedef struct queue {\n",
    "for (size_t i = 0; i < count; i++) {\n        if (items[i].key == key) {\n",
    "static inline uint32_t rotl32(uint32_t x, int r)\n{\n",
    "void matrix_multiply(const float *a, const float *b, float *c, int n)\n{\n    for (int i = 0; i < n; i++) {\n",
    "typedef enum {\n    STATE_IDLE,\n    STATE_RUNNING,\n",
    "int list_push(struct list *list, void *value)\n{\n    struct node *node = malloc(sizeof(*node));\n",
    "#define MAX(a, b) ((a) > (b) ? (a) : (b))\n#define MIN(a, b)",
    "static PyObject *\nspam_system(PyObject *self, PyObject *args)\n{\n    const char *command;\n",
    "template <typename T>\nclass Vector {\npublic:\n    explicit Vector(size_t n)",
    "if (ptr == NULL) {\n        fprintf(stderr, \"out of memory\\n\");\n",
    "namespace detail {\n\ninline int64_t ceil_div(int64_t a, int64_t b) {\n",
    "uint64_t hash_bytes(const unsigned char *data, size_t len)\n{\n    uint64_t h = 1469598103934665603ULL;\n",
    "at::Tensor add_scaled(const at::Tensor& self, const at::Tensor& other, double alpha) {\n",
    "void *arena_alloc(struct arena *arena, size_t size)\n{\n    size_t aligned = (size + 15) & ~(size_t)15;\n",
)


def _package_files(name: str) -> list[Path]:
    root = Path(importlib.import_module(name).__file__).parent
    return sorted(p for p in root.rglob("*.py") if p.stat().st_size > 2000)


def _code_prompts(per_package: int, chars: int) -> list[str]:
    out = []
    for name in HELD_OUT_PACKAGES:
        files = _package_files(name)
        for path in files[:: max(1, len(files) // per_package)][:per_package]:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            start = len(lines) // 2
            while start < len(lines) and not lines[start].strip():
                start += 1
            out.append("".join(lines[start:])[:chars])
    return out


def _docstring_prompts(per_package: int, chars: int) -> list[str]:
    out = []
    for name in HELD_OUT_PACKAGES:
        docs = []
        for path in _package_files(name):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.Module):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 300 and ">>>" not in doc:
                        docs.append(doc)
        docs.sort(key=lambda d: (-len(d), d))
        out += [d[:chars] for d in docs[:per_package]]
    return out


def build_prompts(per_package: int = 4, chars: int = 240) -> list[dict]:
    """[{"id", "domain", "prompt"}], deterministic for a given set of installed held-out packages."""
    items = [("python", p) for p in _code_prompts(per_package, chars)]
    items += [("prose", p) for p in _docstring_prompts(per_package, chars)]
    items += [("c", p) for p in C_PROMPTS]
    return [{"id": f"{domain}-{i}", "domain": domain, "prompt": text} for i, (domain, text) in enumerate(items)]


def write_prompts(path: Path, prompts: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    return path
