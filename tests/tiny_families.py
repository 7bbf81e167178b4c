"""Tiny random-weight checkpoints shaped like the supported families, built with `transformers` and saved with
`save_pretrained` (no downloads): shared by the unit and integration tests of bring-your-own-model."""

import zlib

import torch
from transformers import GenerationConfig

VOCAB = 384
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "llama3.1": ("LlamaConfig", dict(max_position_embeddings=131_072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, tie_word_embeddings=False)),
    "llama-biases": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, max_position_embeddings=512)),
    "qwen2.5": ("Qwen2Config", dict(max_position_embeddings=512, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, max_position_embeddings=512, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=12, max_position_embeddings=512)),
}
PROMPT_LEN, NEW_TOKENS = 20, 24  # past Mistral's 12-token window


def build(family: str, path, **overrides):
    import transformers

    config_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**SHAPE, **extra, **overrides})
    torch.manual_seed(zlib.crc32(family.encode()))
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random biases and norms too, so that dropping one would show
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    return path


def load(path):
    from specfleet.training.train import load_model

    return load_model(path)


def with_tokenizer(family: str, path, models_dir, **overrides):
    """A tiny checkpoint of the family on the bundled tokenizer (8,192 tokens), as a user's folder would be."""
    from transformers import AutoTokenizer

    build(family, path, vocab_size=8192, **overrides)
    AutoTokenizer.from_pretrained(str(models_dir / "target")).save_pretrained(path)
    return path


def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """Hugging Face greedy generate, not stopping at EOS (the engine side runs with ignore_eos; min_new_tokens
    would mask EOS instead, changing the output)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor(prompts), do_sample=False, max_new_tokens=new_tokens,
                             generation_config=GenerationConfig(eos_token_id=None, pad_token_id=0))
    return out[:, len(prompts[0]):]
