"""Bring your own model: tiny random-weight checkpoints shaped like the supported families (Llama-3.1 with GQA and
llama3 rope scaling at 131,072 positions, Llama with biases, Qwen2.5, Qwen3, Mistral with a sliding window), built
with `transformers` and saved with `save_pretrained` (no downloads). The runner's logits equal Hugging Face's, the
engine's greedy output equals `generate` (plain and speculative, the model drafting for itself through token trees),
and whatever the runner does not implement is refused at load, naming it."""

import json
import re

import pytest
import torch
from tiny_families import FAMILIES, NEW_TOKENS, PROMPT_LEN, VOCAB, build, hf_generate, load, with_tokenizer

from specfleet.engine.drafters import DrafterModel, ModelProposer
from specfleet.engine.engine import Request, SpecEngine
from specfleet.engine.llama import LlamaRunner, UnsupportedModel, causal_bias
from specfleet.engine.proposers import NoProposer


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory):
    return request.param, load(build(request.param, tmp_path_factory.mktemp(request.param)))


def prompts(n: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(3, VOCAB, (n, PROMPT_LEN), generator=generator).tolist()


def test_logits_equal_hugging_face(family_model):
    _, model = family_model
    runner = LlamaRunner(model, slots=1, max_len=128)
    ids = torch.tensor([prompts(1)[0] * 2])  # 40 tokens: past the sliding window
    n = ids.shape[1]
    cols = torch.arange(n)[None]
    got = runner.forward(ids, cols, cols, causal_bias([0], [n], n))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("speculative", [False, True])
def test_greedy_equals_generate(family_model, speculative):
    _, model = family_model
    proposer = ModelProposer([DrafterModel("self", model, 4)]) if speculative else NoProposer()
    engine = SpecEngine(model, proposer, max_batch=4, k=3)
    results = engine.generate([Request(f"r{i}", p, NEW_TOKENS, ignore_eos=True) for i, p in enumerate(prompts())])
    want = hf_generate(model, prompts(), NEW_TOKENS)
    assert [r.token_ids for r in results] == want.tolist()
    if speculative:
        assert sum(r.stats["accepted_tokens"] for r in results) > 0


def test_an_unsupported_family_is_refused(tmp_path):
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModel, match="model_type 'gpt2' is not supported"):
        LlamaRunner(model, slots=1, max_len=64)


@pytest.mark.parametrize("field,value,message", [
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ("logit_softcap", 30.0, "config field\\(s\\) logit_softcap"),
    ("rope_parameters", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, "rope_type 'dynamic'"),
])
def test_a_field_the_runner_would_ignore_is_refused(tmp_path, field, value, message):
    model = load(build("llama-biases", tmp_path / "m", **{field: value}))
    with pytest.raises(UnsupportedModel, match=message):
        LlamaRunner(model, slots=1, max_len=64)


def test_a_weight_the_runner_would_ignore_is_refused(tmp_path):
    model = load(build("qwen2.5", tmp_path / "m"))
    model.model.layers[1].self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(64))  # Qwen2 has none there
    model.model.layers[0].extra_scale = torch.nn.Parameter(torch.ones(64))
    with pytest.raises(UnsupportedModel, match="model.layers.0.extra_scale"):
        LlamaRunner(model, slots=1, max_len=64)
    del model.model.layers[0].extra_scale
    LlamaRunner(model, slots=1, max_len=64)  # the o_proj bias is implemented (Llama's attention_bias has one)


def test_generate_takes_models_by_path(tmp_path, models_dir):
    """`generate --target PATH --drafter NAME=PATH` runs a user's checkpoints under free names; greedy output equals
    Hugging Face generate on the same target."""
    import json

    from specfleet.cli.main import main

    target = with_tokenizer("qwen2.5", tmp_path / "qwen-target", models_dir)
    drafter = with_tokenizer("qwen2.5", tmp_path / "qwen-small", models_dir, num_hidden_layers=1)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "def main():\n    return"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--target", str(target), "--drafter", f"small-qwen={drafter}", "--proposer", "model",
                 "--drafters", "small-qwen", "--input", str(source), "--output", str(out), "--max-new-tokens", "12",
                 "--quiet"]) == 0
    got = json.loads(out.read_text())["token_ids"]
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(target))("def main():\n    return").input_ids
    assert [got] == hf_generate(load(target), [ids], 12).tolist()


def test_a_drafter_with_another_vocabulary_is_refused_at_load(tmp_path, models_dir, capsys):
    from specfleet.cli.main import main
    from specfleet.engine.models import ModelSet, check_compatible

    target = with_tokenizer("llama-biases", tmp_path / "target", models_dir)
    small = build("llama-biases", tmp_path / "small")  # 384 tokens
    with pytest.raises(SystemExit, match="drafter tiny .* has vocab_size=384 but the target .* has vocab_size=8192"):
        main(["generate", "--target", str(target), "--drafter", f"tiny={small}", "--proposer", "fused",
              "--drafters", "tiny", "--prompt", "x", "--max-new-tokens", "2"])
    # same size, another tokenizer: the first differing token is named
    other = with_tokenizer("llama-biases", tmp_path / "other", models_dir)
    config = json.loads((other / "tokenizer.json").read_text())
    vocab = config["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == n) for n in (300, 301))
    vocab[a], vocab[b] = 301, 300  # two tokens swapped
    (other / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(f"token id 300 is {b!r} for the drafter and {a!r} for the target")):
        check_compatible(target, other, "other")
    with pytest.raises(ValueError, match="NAME=PATH"):
        ModelSet.bundled(models_dir).with_overrides(drafters=["nopath"])
    with pytest.raises(ValueError, match="no model for the drafter x"):
        ModelSet.bundled(models_dir).with_overrides(drafters=[f"x={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="DNS label"):
        ModelSet.bundled(models_dir).with_overrides(drafters=[f"Bad_Name={small}"])


def test_the_kv_cache_is_allocated_from_its_budget(tmp_path):
    """The 131,072-position Llama-3.1 shape: the cache is sized by --max-model-len and --kv-cache-memory, never
    slots x max_position_embeddings beyond the budget; a budget that holds no request is an error naming the flags."""
    from specfleet.engine.llama import KvLimits, kv_bytes_per_column

    model = load(build("llama3.1", tmp_path / "m"))
    column = kv_bytes_per_column(model.config)  # 2 layers x 2 KV heads x 16 dims x 4 bytes x (K, V)
    assert column == 512

    def cache_bytes(runner):  # at its largest: every slot's cache grown to max_len
        runner.reserve(runner.max_len)
        return 2 * runner.k_cache.numel() * runner.k_cache.element_size()

    runner = LlamaRunner(model, slots=4, limits=KvLimits(max_model_len=256))
    assert (runner.max_positions, runner.max_len, runner.slots) == (256, 320, 4)
    assert cache_bytes(runner) == 4 * 320 * 512
    budget = 3 * (131_072 + 64) * 512
    runner = LlamaRunner(model, slots=8, limits=KvLimits(kv_cache_memory=budget))
    assert runner.slots == 3 and runner.max_positions == 131_072 and cache_bytes(runner) <= budget
    with pytest.raises(ValueError, match="lower --max-model-len or raise --kv-cache-memory"):
        LlamaRunner(model, slots=1, limits=KvLimits(kv_cache_memory=1 << 20))
    engine = SpecEngine(model, NoProposer(), max_batch=8, limits=KvLimits(max_model_len=64, kv_cache_memory=budget))
    assert engine.max_batch == 8 and engine.max_positions == 64
    with pytest.raises(ValueError, match="context of 64"):
        engine.generate([Request("long", list(range(3, 63)), 8)])
    out = engine.generate([Request(f"r{i}", list(range(3, 40)), 8, ignore_eos=True) for i in range(12)])
    assert len(out) == 12 and all(len(r.token_ids) == 8 for r in out)  # more requests than slots: they wait


@pytest.mark.parametrize("family", ["llama3.1", "qwen3", "mistral"])
def test_bfloat16_matches_hugging_face_in_bfloat16(tmp_path, family):
    """In bfloat16 (weights, activations, KV cache) the runner computes what Hugging Face computes in bfloat16: logits
    within bfloat16 rounding, and greedy output equal up to a near-tie (at the first difference, Hugging Face's own
    top-2 logits lie within two bfloat16 steps)."""
    from specfleet.engine.factory import load_model
    from specfleet.engine.models import ModelSet

    path = build(family, tmp_path / "m")
    model = load_model(ModelSet(path, dtype="bfloat16"), "target")
    assert model.dtype == torch.bfloat16
    runner = LlamaRunner(model, slots=1, max_len=128)
    assert runner.k_cache.dtype == torch.bfloat16
    ids = torch.tensor([prompts(1)[0] * 2])
    n = ids.shape[1]
    cols = torch.arange(n)[None]
    got = runner.forward(ids, cols, cols, causal_bias([0], [n], n)).float()
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    engine = SpecEngine(model, ModelProposer([DrafterModel("self", model, 4)]), max_batch=4, k=3)
    results = engine.generate([Request(f"r{i}", p, NEW_TOKENS, ignore_eos=True) for i, p in enumerate(prompts())])
    for prompt, result, reference in zip(prompts(), results, hf_generate(model, prompts(), NEW_TOKENS).tolist(),
                                         strict=True):
        if result.token_ids == reference:
            continue
        i = next(j for j, (a, b) in enumerate(zip(result.token_ids, reference, strict=True)) if a != b)
        with torch.no_grad():
            top2 = model(input_ids=torch.tensor([prompt + reference[:i]])).logits[0, -1].float().topk(2).values
        assert float(top2[0] - top2[1]) <= 2 * 2 ** -7 * float(top2[0].abs()), f"differs at token {i}, not a tie"


def test_the_cache_grows_with_the_longest_context(tmp_path):
    """Columns are allocated as contexts reach them, keeping what the cache holds: logits after growing equal a
    cache allocated at full length from the start."""
    model = load(build("qwen3", tmp_path / "m"))
    grown, full = LlamaRunner(model, slots=2, max_len=400), LlamaRunner(model, slots=2, max_len=400)
    full.reserve(400)
    assert grown.columns == 256 and full.columns == 400
    ids = torch.tensor([prompts(1)[0] * 15])  # 300 tokens, fed in two calls: the second one grows the cache
    for runner in (grown, full):
        first = causal_bias([0], [200], 200)
        runner.forward(ids[:, :200], torch.arange(200)[None], torch.arange(200)[None], first)
    cols = torch.arange(200, 300)[None]
    bias = causal_bias([200], [100], 300)
    a, b = (runner.forward(ids[:, 200:], cols, cols, bias) for runner in (grown, full))
    assert grown.columns == 400 and torch.equal(a, b)
    with pytest.raises(ValueError, match="at most 400"):
        grown.reserve(401)


def test_the_cli_default_kv_budget_is_the_runners():
    from specfleet.cli.options import DEFAULT_KV_CACHE_MEMORY_TEXT, byte_size
    from specfleet.engine.llama import DEFAULT_KV_CACHE_MEMORY

    assert byte_size(DEFAULT_KV_CACHE_MEMORY_TEXT) == DEFAULT_KV_CACHE_MEMORY
