"""Builds the bundled model family from text on this machine: corpora, tokenizer, target, drafters, model cards."""
