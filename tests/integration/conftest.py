"""Fixtures shared by the fleet switch tests: the target's own outputs for the prompts in switches.py, greedy
(Hugging Face `generate`) and sampled (plain decoding under one seed), computed once per session."""

import pytest

from .references import target_greedy
from .switches import NEW_TOKENS, PROMPTS, SAMPLED


@pytest.fixture(scope="session")
def prompt_ids(tokenizer):
    return [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]


@pytest.fixture(scope="session")
def greedy_refs(load_model, prompt_ids, tokenizer):
    return target_greedy(load_model("target"), prompt_ids, NEW_TOKENS, tokenizer.pad_token_id)


@pytest.fixture(scope="session")
def sampled_refs(load_model, prompt_ids, models_dir):
    from specfleet.engine.engine import Request
    from specfleet.engine.factory import build_engine

    engine = build_engine(models_dir, "none", (), batch_size=4, k=1, adaptive=False, target=load_model("target"))
    results = engine.generate([Request(f"s{i}", p, NEW_TOKENS, SAMPLED) for i, p in enumerate(prompt_ids)])
    return [r.token_ids for r in results]
