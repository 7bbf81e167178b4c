"""The family's tokenizer: shared by every model, byte-level, and exactly reversible on any text."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import MODEL_NAMES, MODELS_DIR

CODE_SAMPLES = [
    "def f(x):\n\treturn x  # tab, then two spaces\n\n\n",
    "#include <vector>\nint main() { std::vector<int> v{1, 2}; return v[0]; }\r\n",
    "    \u00a0non-breaking\u2003em-space   trailing   \n",
    "emoji 🧪🚀 and CJK 漢字 and RTL עברית and combining e\u0301",
    "<|endoftext|> appears as text",
    "",
]


def test_vocabulary_size_and_special_tokens(tokenizer):
    assert 8000 <= len(tokenizer) <= 16384
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_every_model_folder_has_the_same_tokenizer():
    reference = json.loads((MODELS_DIR / "target" / "tokenizer.json").read_text())
    for name in MODEL_NAMES:
        assert json.loads((MODELS_DIR / name / "tokenizer.json").read_text()) == reference, name


def _roundtrip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert tokenizer.decode(ids) == text


def test_code_and_whitespace_roundtrip(tokenizer):
    for text in CODE_SAMPLES:
        _roundtrip(tokenizer, text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_arbitrary_unicode_roundtrips(tokenizer, text):
    _roundtrip(tokenizer, text)


def test_held_out_source_roundtrips(tokenizer, held_out_text):
    for text in held_out_text.values():
        _roundtrip(tokenizer, text)


def test_every_bundled_folder_carries_the_training_chat_template(models_dir):
    """`specfleet train tokenizer` writes the same chat template the bundled folders carry (a rebuild keeps chat)."""
    import json

    from specfleet.training.tokenizer import CHAT_TEMPLATE

    for folder in sorted(p for p in models_dir.iterdir() if (p / "tokenizer_config.json").exists()):
        assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE, folder
