"""`specfleet generate`, the command-line contract other tools rely on, run in-process on the bundled models:
JSONL lines in, one output line per input line in input order; greedy output is the target's own and the same for
every proposer and batch size; sampled output is reproducible from the seed; bad input exits with a message that
names the problem (and its file:line), never a traceback; `--prompt` streams text to stdout, stats to stderr."""

import json
import sys

import pytest
import torch

from specfleet.cli.main import main

NEW_TOKENS = 8
PROMPTS = [  # (id as written in the file, or None for a line without one; prompt)
    ("py", "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n\n\ndef "),
    (7, "The request handler validates its input before"),
    (None, "#include <stdint.h>\n\nstatic inline uint32_t"),
    ("x-1", "for i in range(10):\n    print(i)\nfor i in range(10):\n    print("),  # repetitive: ngram/suffix draft
]
OUTPUT_KEYS = {"id", "text", "token_ids", "finish_reason", "stats"}
STATS_KEYS = {"rounds", "draft_tokens", "accepted_tokens", "accepted_per_round"}
SAMPLING = ["--temperature", "0.8", "--top-p", "0.95"]


def write_input(path, items=PROMPTS):
    lines = [json.dumps({"prompt": prompt} if rid is None else {"id": rid, "prompt": prompt}) for rid, prompt in items]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def generate(tmp_path, *options, name="out"):
    """Runs `specfleet generate` on PROMPTS and returns the output lines as dicts."""
    source = tmp_path / "in.jsonl"
    if not source.exists():
        write_input(source)
    out = tmp_path / name / "out.jsonl"  # a folder that does not exist yet: generate creates it
    argv = ["generate", "--input", str(source), "--output", str(out), "--max-new-tokens", str(NEW_TOKENS), "--quiet"]
    assert main([*argv, *options]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def continuations(lines):
    return [(line["id"], line["token_ids"], line["text"], line["finish_reason"]) for line in lines]


@pytest.fixture(scope="module")
def greedy_reference(tmp_path_factory):
    """Plain decoding through the same code path: proposer none, one request at a time."""
    return generate(tmp_path_factory.mktemp("reference"), "--proposer", "none", "--batch-size", "1")


def test_output_lines_follow_the_contract(greedy_reference, tokenizer, load_model):
    lines = greedy_reference
    assert [line["id"] for line in lines] == ["py", 7, 2, "x-1"], "input order; ids kept (str and int); default = index"
    target = load_model("target")
    for line, (_, prompt) in zip(lines, PROMPTS, strict=True):
        assert set(line) == OUTPUT_KEYS and set(line["stats"]) == STATS_KEYS
        ids = line["token_ids"]
        assert all(isinstance(t, int) for t in ids) and line["text"] == tokenizer.decode(ids)
        assert line["finish_reason"] == "length" and len(ids) == NEW_TOKENS
        # the generated tokens only (no prompt), and exactly the target's own greedy continuation
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            want = target.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                   pad_token_id=tokenizer.pad_token_id)[0, len(prompt_ids):].tolist()
        assert ids == want
        stats = line["stats"]
        assert stats["rounds"] == NEW_TOKENS and stats["draft_tokens"] == stats["accepted_tokens"] == 0
        assert stats["accepted_per_round"] == 0.0


@pytest.mark.parametrize("options", [
    ["--proposer", "none", "--batch-size", "3"],
    ["--proposer", "ngram", "--batch-size", "3"],
    ["--proposer", "suffix", "--batch-size", "3"],
    ["--proposer", "model", "--batch-size", "3", "--no-adaptive"],
    ["--proposer", "model", "--drafters", "python", "--batch-size", "1"],
    ["--proposer", "fused", "--batch-size", "1"],
    ["--proposer", "fused", "--batch-size", "3", "--no-adaptive"],
    ["--proposer", "fused", "--drafters", "python,c", "--batch-size", "4", "--no-adaptive", "--k", "3"],
], ids=" ".join)
def test_greedy_output_is_the_same_for_every_proposer_and_batch_size(options, greedy_reference, tmp_path):
    lines = generate(tmp_path, *options)
    assert continuations(lines) == continuations(greedy_reference)
    for line in lines:
        stats = line["stats"]
        assert stats["accepted_tokens"] <= stats["draft_tokens"]
        assert stats["rounds"] + stats["accepted_tokens"] == NEW_TOKENS, "each round: accepted drafts + one token"
        assert stats["accepted_per_round"] == round(stats["accepted_tokens"] / stats["rounds"], 4)
    if "--no-adaptive" in options or options[1] in ("ngram", "suffix"):
        # the adaptive controller prices drafting from timings measured at start: on a loaded machine it may
        # rightly decode plainly for all 8 tokens, so only fixed-k (and free suffix/ngram) runs must have drafted
        assert sum(line["stats"]["draft_tokens"] for line in lines) > 0, "the proposer drafted (else nothing tested)"


def test_sampled_output_is_reproducible_from_the_seed(tmp_path, greedy_reference):
    first = generate(tmp_path, *SAMPLING, "--seed", "7", "--batch-size", "3", name="a")
    assert [line["id"] for line in first] == ["py", 7, 2, "x-1"]
    assert all(len(line["token_ids"]) == NEW_TOKENS or line["finish_reason"] == "stop" for line in first)
    assert continuations(first) != continuations(greedy_reference), "sampling, not greedy decoding"
    again = generate(tmp_path, *SAMPLING, "--seed", "7", "--batch-size", "3", name="b")
    assert continuations(again) == continuations(first), "equal seeds, equal samples"
    alone = generate(tmp_path, *SAMPLING, "--seed", "7", "--batch-size", "1", name="c")
    assert continuations(alone) == continuations(first), "samples do not depend on --batch-size"
    plain = generate(tmp_path, *SAMPLING, "--seed", "7", "--batch-size", "4", "--proposer", "none", name="d")
    assert continuations(plain) == continuations(first), "nor on what was drafted"
    other = generate(tmp_path, *SAMPLING, "--seed", "8", "--batch-size", "3", name="e")
    assert sum(a != b for a, b in zip(continuations(other), continuations(first), strict=True)) >= 1


def test_prompt_streams_text_to_stdout_and_stats_to_stderr(greedy_reference, capsys):
    _, prompt = PROMPTS[1]
    assert main(["generate", "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS), "--proposer", "fused"]) == 0
    captured = capsys.readouterr()
    assert captured.out == greedy_reference[1]["text"] + "\n"
    assert f"[{NEW_TOKENS} tokens in" in captured.err and "accepted per round]" in captured.err
    assert "tok/s" not in captured.out


class _Chunks:
    """A stdout that records every write."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_prompt_text_arrives_in_pieces_as_it_is_generated(greedy_reference, monkeypatch):
    _, prompt = PROMPTS[3]
    monkeypatch.setattr(sys, "stdout", _Chunks())
    assert main(["generate", "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS), "--proposer", "none"]) == 0
    writes = [w for w in sys.stdout.writes if w]
    assert "".join(writes) == greedy_reference[3]["text"] + "\n"
    assert len(writes) >= NEW_TOKENS // 2, f"streamed per round, not at the end: {writes}"


def test_a_prompt_that_fills_the_context_exactly_is_served(tmp_path, tokenizer):
    text = "x = 1\n" * 254  # 1016 tokens: with 8 new tokens exactly the model's context of 1024
    assert len(tokenizer(text, add_special_tokens=False).input_ids) + NEW_TOKENS == 1024
    write_input(tmp_path / "in.jsonl", [("long", text)])
    (line,) = generate(tmp_path, "--proposer", "fused")
    assert len(line["token_ids"]) == NEW_TOKENS or line["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------------------------
# Bad input: SystemExit with a message naming the problem, no traceback.


def exit_message(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    message = exc.value.code
    assert isinstance(message, str) and message.startswith("error: "), f"exit code {message!r}, not a message"
    assert "Traceback" not in capsys.readouterr().err
    return message


def bad_file_argv(tmp_path, content: str | None, *options):
    source = tmp_path / "in.jsonl"
    if content is not None:
        source.write_text(content, encoding="utf-8")
    # proposer none and batch 1: no drafter to load and a small KV cache, so each refusal is quick
    return ["generate", "--input", str(source), "--output", str(tmp_path / "out.jsonl"), "--quiet",
            "--proposer", "none", "--batch-size", "1", "--max-new-tokens", str(NEW_TOKENS), *options], source


@pytest.mark.parametrize("content,expected", [
    (None, "{path}: no such file"),
    ('{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b"\n', "{path}:2: not valid JSON"),
    ('{"id": 1, "prompt": "a"}\n\n{"id": 2, "text": "b"}\n', '{path}:3: each line needs a string "prompt" field'),
    ('{"id": 1, "prompt": 5}\n', '{path}:1: each line needs a string "prompt" field'),
    ('{"id": 1, "prompt": ""}\n', "{path}:1: the prompt is empty"),
    ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n',
     "{path}:3: duplicate id 'a'"),
    ('{"id": [1], "prompt": "x"}\n', '{path}:1: "id" must be a string or an integer'),
    ("\n\n", "{path}: no prompts"),
], ids=["missing-file", "invalid-json", "missing-prompt", "prompt-not-text", "empty-prompt", "duplicate-id",
        "bad-id", "no-prompts"])
def test_bad_input_file_exits_with_file_and_line(content, expected, tmp_path, capsys):
    argv, source = bad_file_argv(tmp_path, content)
    message = exit_message(argv, capsys)
    assert expected.format(path=source) in message
    assert not (tmp_path / "out.jsonl").exists(), "no partial output"


def test_prompt_longer_than_the_context_is_refused_with_its_id(tmp_path, tokenizer, capsys):
    text = "x = 1\n" * 254  # 1016 tokens
    n = len(tokenizer(text, add_special_tokens=False).input_ids)
    lines = json.dumps({"id": "short", "prompt": "a"}) + "\n" + json.dumps({"id": "long", "prompt": text}) + "\n"
    argv, source = bad_file_argv(tmp_path, lines, "--max-new-tokens", str(1025 - n))
    message = exit_message(argv, capsys)
    assert "'long'" in message and "exceeds the model's context of 1024" in message and f"({n} tokens)" in message
    too_long = exit_message(bad_file_argv(tmp_path, json.dumps({"prompt": text * 2}) + "\n")[0], capsys)
    assert "exceeds the model's context of 1024" in too_long


@pytest.mark.parametrize("options,expected", [
    (["--drafters", "python,pyton"], "unknown drafter(s) pyton; choose from"),
    (["--proposer", "model", "--drafters", "python,prose"], "--proposer model drafts with exactly one drafter"),
    (["--proposer", "fused", "--drafters", ","], "unknown drafter(s) (none given)"),
], ids=["unknown-drafter", "model-with-two-drafters", "no-drafter-named"])
def test_bad_drafter_options_exit_with_what_to_fix(options, expected, tmp_path, capsys):
    argv, _ = bad_file_argv(tmp_path, '{"prompt": "a"}\n')
    argv = [a for a in argv if a not in ("--proposer", "none")]
    assert expected in exit_message([*argv, *options], capsys)


def test_input_without_output_exits_with_what_to_fix(tmp_path, capsys):
    source = write_input(tmp_path / "in.jsonl")
    assert "--input needs --output" in exit_message(["generate", "--input", str(source)], capsys)
    assert "give either --prompt" in exit_message(["generate", "--output", str(tmp_path / "o.jsonl")], capsys)
