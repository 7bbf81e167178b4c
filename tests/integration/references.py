"""The target's own greedy continuation (Hugging Face `generate`), the reference every lossless fleet test compares
against."""

import torch


def target_greedy(target, prompts: list[list[int]], new_tokens: int, pad_token_id: int | None) -> list[list[int]]:
    """Each prompt's greedy continuation of `new_tokens` tokens by `target`, one prompt at a time."""
    with torch.no_grad():
        return [target.generate(torch.tensor([p]), do_sample=False, max_new_tokens=new_tokens,
                                pad_token_id=pad_token_id)[0, len(p):].tolist() for p in prompts]
