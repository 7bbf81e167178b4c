"""Chat conversations: the one check of a list of messages says what to fix, the bundled tokenizer (every model folder
alike) renders a conversation with its chat template ending in the assistant's turn, a tokenizer without a template is
refused in words, and the SDK puts a checked conversation on the wire."""

import json

import pytest

from specfleet.runtime.chat import CHAT_ROLES, chat_prompt_ids, check_messages
from specfleet.sdk.core import build_request

from conftest import MODEL_NAMES, MODELS_DIR

CONVERSATION = [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": "a loop"},
                {"role": "assistant", "content": "for i in range(3):"}, {"role": "user", "content": "again"}]


@pytest.mark.parametrize("messages,words", [
    (None, "non-empty list"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    (["hello"], "messages[0] must be an object"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}], "messages[1].role must be one of"),
    ([{"content": "hi"}], "messages[0].role must be one of system, user, assistant, got None"),
    ([{"role": "user"}], "messages[0].content must be a string"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "text parts, images and tool calls"),
])
def test_bad_messages_say_what_to_fix(messages, words):
    with pytest.raises(ValueError) as exc:
        check_messages(messages)
    assert words in str(exc.value)


def test_checked_messages_keep_role_and_content_only():
    assert check_messages([{"role": "user", "content": "", "name": "ann"}]) == [{"role": "user", "content": ""}]
    assert check_messages(tuple(CONVERSATION)) == CONVERSATION
    assert set(CHAT_ROLES) == {"system", "user", "assistant"}


def test_every_model_folder_has_the_same_chat_template():
    templates = {name: json.loads((MODELS_DIR / name / "tokenizer_config.json").read_text()).get("chat_template")
                 for name in MODEL_NAMES}
    assert len(set(templates.values())) == 1 and templates["target"], templates


def test_the_bundled_template_renders_roles_and_ends_in_the_assistants_turn(tokenizer):
    ids = chat_prompt_ids(tokenizer, CONVERSATION)
    text = ("<|system|>\nAnswer in code.\n<|user|>\na loop\n<|assistant|>\nfor i in range(3):\n<|user|>\nagain\n"
            "<|assistant|>\n")
    assert ids == tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text


def test_a_tokenizer_without_a_chat_template_is_refused(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match="has no chat template"):
        chat_prompt_ids(tokenizer, CONVERSATION)


def test_sdk_requests_carry_a_checked_conversation():
    request = build_request(messages=CONVERSATION, max_new_tokens=3, seed=1)
    assert [(m.role, m.content) for m in request.messages] == [(m["role"], m["content"]) for m in CONVERSATION]
    assert not request.prompt and not request.prompt_token_ids
    with pytest.raises(ValueError, match="either messages or a prompt"):
        build_request("x", messages=CONVERSATION)
    with pytest.raises(ValueError, match="role must be one of"):
        build_request(messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="the prompt is empty"):
        build_request()
