"""Shared fixtures: the bundled models, loaded offline (no hub access is possible or wanted)."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from specfleet.training.family import MODEL_NAMES  # noqa: E402,F401  (shared with the tests)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "models"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS_DIR


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODELS_DIR / "target"))


@pytest.fixture(scope="session")
def load_model():
    import torch
    from transformers import AutoModelForCausalLM

    cache = {}

    def load(name: str):
        if name not in cache:
            cache[name] = AutoModelForCausalLM.from_pretrained(str(MODELS_DIR / name), dtype=torch.float32).eval()
        return cache[name]

    return load


@pytest.fixture(scope="session")
def held_out_text() -> dict[str, str]:
    """Text from the held-out packages (never in any training split), one sample per domain-like source."""
    import jwt
    import pygments
    import requests
    import yaml

    def read(mod, name):
        return (Path(mod.__file__).parent / name).read_text(encoding="utf-8")

    return {
        "python": read(requests, "sessions.py"),
        "prose": requests.__doc__ + "\n" + (yaml.__doc__ or "") + read(requests, "api.py").split('"""')[3],
        "code": read(jwt, "api_jws.py") + read(pygments, "lexer.py")[:4000],
    }


def write_random_head(out: Path, target) -> Path:
    """A random-weight draft head for the bundled target, of a trained head's scale (its drafts are not a constant),
    saved to `out` as `specfleet train head` would: tests never depend on models/ holding a trained head."""
    import torch

    from specfleet.training.head import TrainHead, head_config, save_head, target_fingerprint

    torch.manual_seed(3)
    head = TrainHead(head_config(target.config), target.model.embed_tokens.weight)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    save_head(head, head_config(target.config), out, {"target_fingerprint": target_fingerprint(MODELS_DIR / "target")})
    return out
