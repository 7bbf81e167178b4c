"""The engine on a CUDA device (`--device cuda`): skipped where torch sees none; `make gpu-check` runs it on a GPU.

- bfloat16 on CUDA: the runner's logits are Hugging Face's within bfloat16 rounding, and its greedy output -- plain
  and speculative (the model drafting for itself through token trees) -- equals Hugging Face `generate` on the same
  device up to a near-tie, for tiny checkpoints of the supported families (tests/tiny_families.py);
- the bundled models on CUDA: every tensor the runner holds is on the device, greedy output equals Hugging Face's for
  every proposer (up to a near-tie), and sampled decoding runs to length for every proposer.

SPECFLEET_TEST_DEVICE=cpu runs the same checks on the CPU (how they were written without a GPU)."""

import os

import pytest
import torch
from tiny_families import NEW_TOKENS, PROMPT_LEN, VOCAB, build

from specfleet.engine.drafters import DrafterModel, ModelProposer
from specfleet.engine.engine import Request, SpecEngine
from specfleet.engine.factory import build_engine, load_model
from specfleet.engine.llama import LlamaRunner, causal_bias
from specfleet.engine.models import ModelSet
from specfleet.engine.proposers import NoProposer
from specfleet.engine.sampling import SamplingParams
from specfleet_kernels import backend_for

DEVICE = os.environ.get("SPECFLEET_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="no CUDA device is visible to torch (make gpu-check runs these on a GPU)")


def prompts(n: int = 3) -> list[list[int]]:
    generator = torch.Generator(device="cpu").manual_seed(7)
    return torch.randint(3, VOCAB, (n, PROMPT_LEN), generator=generator).tolist()


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Hugging Face greedy generate on the model's device, not stopping at EOS."""
    from transformers import GenerationConfig

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=model.device), do_sample=False, max_new_tokens=new_tokens,
                             generation_config=GenerationConfig(eos_token_id=None, pad_token_id=0))
    return out[0, len(prompt):].tolist()


def assert_equal_or_near_tie(model, prompt, got, want, tie):
    """Equal, or at the first difference Hugging Face's own top-2 logits lie within `tie` (relative)."""
    if got == want:
        return
    i = next(j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
    with torch.no_grad():
        top2 = model(input_ids=torch.tensor([prompt + want[:i]], device=model.device)).logits[0, -1].float().topk(2)
    gap = float(top2.values[0] - top2.values[1])
    assert gap <= tie * max(1.0, float(top2.values[0].abs())), f"differs at token {i}, top-2 gap {gap:.2e}: no tie"


@pytest.mark.parametrize("family", ["llama3.1", "llama-biases", "qwen2.5", "qwen3", "mistral"])
def test_bfloat16_on_the_device_matches_hugging_face(tmp_path, family):
    model = load_model(ModelSet(build(family, tmp_path / "m"), dtype="bfloat16", device=DEVICE), "target")
    assert model.dtype == torch.bfloat16 and model.device.type == torch.device(DEVICE).type
    runner = LlamaRunner(model, slots=4, max_len=128)
    assert runner.device == model.device and runner.k_cache.device == model.device
    ids = torch.tensor([prompts(1)[0] * 2], device=runner.device)  # 40 tokens: past Mistral's window
    n = ids.shape[1]
    cols = torch.arange(n, device=runner.device)[None]
    got = runner.forward(ids, cols, cols, causal_bias([0], [n], n, runner.device)).float()
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    for proposer in (NoProposer(), ModelProposer([DrafterModel("self", model, 4)])):
        engine = SpecEngine(model, proposer, max_batch=4, k=3)
        results = engine.generate([Request(f"r{i}", p, NEW_TOKENS, ignore_eos=True) for i, p in enumerate(prompts())])
        for prompt, result in zip(prompts(), results, strict=True):
            assert_equal_or_near_tie(model, prompt, result.token_ids, hf_greedy(model, prompt, NEW_TOKENS),
                                     tie=2 * 2 ** -7)


@pytest.fixture(scope="module")
def bundled(models_dir):
    models = ModelSet.bundled(models_dir).with_overrides(device=DEVICE, dtype="float32")
    return models, load_model(models, "target")


BUNDLED_PROMPTS = ([5, 6, 7, 8, 9, 10, 11, 12] * 3, [11, 12, 13, 14] * 5, [40, 41, 42, 43, 44, 45] * 4)


@pytest.mark.parametrize("proposer", ["none", "suffix", "fused", "head"])
def test_bundled_models_on_the_device_greedy_and_sampled(bundled, proposer):
    models, target = bundled
    if proposer == "head" and models.head is None:
        pytest.skip("the bundled models have no draft head")
    engine = build_engine(models, proposer, batch_size=2, k=4, adaptive=False, target=target)
    runner = engine.runner
    held = [runner.embed, runner.k_cache, runner.v_cache, runner.vocab_offsets]
    assert all(t.device == target.device for t in held)
    assert runner.kernels is backend_for(runner.device)  # KV compaction: Triton on CUDA where it runs
    if runner.device.type != "cpu":  # the C kernel is for the CPU only
        assert runner.matmul == "torch"
    new = 24
    greedy = engine.generate([Request(f"g{i}", list(p), new, ignore_eos=True)
                              for i, p in enumerate(BUNDLED_PROMPTS)])
    for prompt, result in zip(BUNDLED_PROMPTS, greedy, strict=True):
        assert_equal_or_near_tie(target, list(prompt), result.token_ids, hf_greedy(target, list(prompt), new),
                                 tie=1e-3)
    sampled = engine.generate([Request(f"s{i}", list(p), new, SamplingParams(0.8, 0.95, 0, 11 + i), ignore_eos=True)
                               for i, p in enumerate(BUNDLED_PROMPTS)])
    assert all(len(r.token_ids) == new for r in sampled)
    assert all(0 <= t < runner.vocab_size for r in sampled for t in r.token_ids)
