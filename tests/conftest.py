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


def target_greedy(target, prompts: list[list[int]], new_tokens: int, pad_token_id: int | None) -> list[list[int]]:
    """Each prompt's greedy continuation of up to `new_tokens` tokens by `target`'s own Hugging Face `generate`,
    stopping at end-of-text as it does for a prompt alone. Prompts of one length share a `generate` call: no padding,
    so every row is the same unpadded greedy decoding as alone; a row that ends early is padded by `generate` after
    its end-of-text token, which is cut off here."""
    import torch

    eos = target.generation_config.eos_token_id
    ends = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    out: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for length in sorted({len(p) for p in prompts}):
            rows = [i for i, p in enumerate(prompts) if len(p) == length]
            ids = target.generate(torch.tensor([prompts[i] for i in rows]), do_sample=False,
                                  max_new_tokens=new_tokens, pad_token_id=pad_token_id)
            for i, new in zip(rows, ids[:, length:].tolist(), strict=True):
                end = next((j for j, t in enumerate(new) if t in ends), len(new) - 1)
                out[i] = new[:end + 1]
    return out


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
