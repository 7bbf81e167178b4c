"""Chat conversations: the one check of a list of messages (the HTTP front, the SDK and the router all run it, so a
bad conversation is refused in the same words wherever it enters) and their rendering into prompt ids with the
model's own chat template (the router does that: it holds the tokenizer)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

CHAT_ROLES = ("system", "user", "assistant")


def check_messages(messages) -> list[dict[str, str]]:
    """[{"role", "content"}, ...] from a list of message mappings; raises ValueError naming the message to fix.
    Other keys of a message (OpenAI's `name`, say) are dropped."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise ValueError('messages must be a non-empty list of {"role", "content"} objects')
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f'messages[{i}] must be an object {{"role", "content"}}, got {type(message).__name__}')
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string (text parts, images and tool calls are not "
                             f"supported), got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids of a checked conversation: the tokenizer's chat template, ending in the assistant's turn.
    Raises ValueError when the model has no template or its template refuses the conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template (its tokenizer_config.json sets no chat_template), so it "
                         "cannot answer messages: send a plain prompt (/v1/completions) instead, or serve a model "
                         "whose tokenizer has a chat template")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001  (a template may raise on a conversation it does not accept)
        raise ValueError(f"the model's chat template refused the messages: {exc}") from None
    # the template writes any special tokens it wants (a BOS, say) itself
    return tokenizer(text, add_special_tokens=False).input_ids
