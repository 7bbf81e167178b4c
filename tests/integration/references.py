"""The target's own greedy continuation (Hugging Face `generate`), the reference every lossless fleet test compares
against (conftest.target_greedy, shared with the unit tests)."""

from conftest import target_greedy

__all__ = ["target_greedy"]
