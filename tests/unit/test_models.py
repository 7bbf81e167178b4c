"""The bundled model family loads offline, has the promised shapes and sizes, and generates deterministically."""

import json

import pytest
import torch

from conftest import MODEL_NAMES, MODELS_DIR


def test_weights_fit_the_repo_budget():
    total = sum(p.stat().st_size for p in MODELS_DIR.rglob("*") if p.is_file())
    assert total <= 60 * 1024 * 1024, f"models/ holds {total / 2**20:.1f} MiB; the budget is 60 MiB"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loads_offline_as_llama(name, load_model):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = load_model(name)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    assert (MODELS_DIR / name / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(str(MODELS_DIR / name))
    assert model.config.vocab_size == len(tok)
    n = sum(p.numel() for p in model.parameters())
    low, high = (20e6, 40e6) if name == "target" else (1e6, 5e6)
    assert low <= n <= high, f"{name} has {n:,} parameters"
    info = json.loads((MODELS_DIR / name / "training.json").read_text())
    assert info["parameters"] == n and info["tokens_seen"] > 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_generation_is_deterministic_under_a_seed(name, load_model, tokenizer):
    model = load_model(name)
    ids = tokenizer("import os\n\ndef main(", return_tensors="pt").input_ids

    def sample(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(ids, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=24,
                                  pad_token_id=tokenizer.pad_token_id)[0].tolist()

    assert sample(7) == sample(7)
    with torch.no_grad():
        greedy = [model.generate(ids, do_sample=False, max_new_tokens=24, pad_token_id=tokenizer.pad_token_id)
                  for _ in range(2)]
    assert torch.equal(greedy[0], greedy[1])
    assert greedy[0].shape[1] == ids.shape[1] + 24 or tokenizer.eos_token_id in greedy[0][0].tolist()


def test_target_continues_held_out_text_better_than_chance(load_model, tokenizer, held_out_text):
    model = load_model("target")
    ids = tokenizer(held_out_text["python"][:3000], return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 0.6 * torch.log(torch.tensor(float(len(tokenizer)))).item()
