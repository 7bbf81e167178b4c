"""Trains the family's one byte-level BPE tokenizer and turns corpora into token arrays for training."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from specfleet.training.corpus import DOMAINS, read_documents

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_VOCAB_SIZE = 8192
SAMPLE_CHARS_PER_DOMAIN = 8_000_000


def _training_texts(corpus_dir: Path, chars_per_domain: int) -> Iterator[str]:
    for domain in DOMAINS:
        taken = 0
        for text in read_documents(corpus_dir, domain, "train"):
            if taken >= chars_per_domain:
                break
            taken += len(text)
            yield text


# A plain chat template (the bundled models are not chat-tuned; this lets /v1/chat/completions render messages).
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def train_tokenizer(corpus_dir: Path, out_dir: Path, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    chars_per_domain: int = SAMPLE_CHARS_PER_DOMAIN):
    """Trains byte-level BPE on an equal share of each domain and saves it as a PreTrainedTokenizerFast.

    No normaliser and a byte-level pre-tokeniser/decoder without prefix space: decode(encode(s)) == s for
    every unicode string, which the engine relies on when it streams text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(_training_texts(corpus_dir, chars_per_domain), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=None,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir, save_jinja_files=False)  # the template in tokenizer_config.json, where it was
    return fast


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def tokenize_corpus(corpus_dir: Path, tokenizer_dir: Path, out_dir: Path, batch_docs: int = 256) -> dict[str, int]:
    """Writes out_dir/{domain}.{split}.bin: uint16 token ids, documents joined by the EOS token."""
    tok = load_tokenizer(tokenizer_dir)
    eos = tok.eos_token_id
    assert len(tok) <= np.iinfo(np.uint16).max, "vocabulary too large for uint16 token files"
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for domain, split in itertools.product(DOMAINS, ("train", "val")):
        path = out_dir / f"{domain}.{split}.bin"
        n = 0
        with open(path, "wb") as f:
            docs = read_documents(corpus_dir, domain, split)
            bar = tqdm(desc=f"tokenizing {domain}.{split}", unit=" tok", unit_scale=True)
            while batch := list(itertools.islice(docs, batch_docs)):
                enc = tok(batch, add_special_tokens=False)["input_ids"]
                ids = np.fromiter(itertools.chain.from_iterable(e + [eos] for e in enc), dtype=np.uint16)
                ids.tofile(f)
                n += len(ids)
                bar.update(len(ids))
            bar.close()
        counts[f"{domain}.{split}"] = n
    return counts
