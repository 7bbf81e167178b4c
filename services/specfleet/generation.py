"""`specfleet generate`: JSONL in, JSONL out through the speculative engine (the contract other tools rely on),
or one prompt streamed to the terminal."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from specfleet.engine.engine import Request, Result
from specfleet.engine.sampling import SamplingParams


class InputError(ValueError):
    """A problem with the user's input file, with the line it is on."""


def read_jsonl(path: Path) -> list[tuple[object, str]]:
    """[(id, prompt)] from lines {"id": ..., "prompt": "..."}; a missing id is the prompt's index (from 0)."""
    items, seen = [], set()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be an object like "
                             '{"id": "a", "prompt": "text"}') from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise InputError(f'{path}:{number}: each line needs a string "prompt" field')
        if not obj["prompt"]:
            raise InputError(f"{path}:{number}: the prompt is empty; give some text to continue")
        rid = obj.get("id", len(items))
        if not isinstance(rid, str | int) or isinstance(rid, bool):
            raise InputError(f'{path}:{number}: "id" must be a string or an integer')
        if rid in seen:
            raise InputError(f"{path}:{number}: duplicate id {rid!r}; ids must be unique")
        seen.add(rid)
        items.append((rid, obj["prompt"]))
    if not items:
        raise InputError(f"{path}: no prompts (expected one JSON object per line)")
    return items


def request_seed(seed: int | None, index: int) -> int | None:
    """Each request gets its own stream so results do not depend on batch size or order of completion."""
    return None if seed is None else (seed * 1_000_003 + index) % (2**63)


def output_record(rid, tokenizer, result: Result) -> dict:
    stats = {k: result.stats[k] for k in ("rounds", "draft_tokens", "accepted_tokens")}
    stats["accepted_per_round"] = round(result.stats["accepted_per_round"], 4)
    return {"id": rid, "text": tokenizer.decode(result.token_ids), "token_ids": result.token_ids,
            "finish_reason": result.finish_reason, "stats": stats}


def run_jsonl(engine, tokenizer, input_path: Path, output_path: Path, max_new_tokens: int,
              params: SamplingParams, progress: bool = True) -> dict:
    """Generates for every line of input_path and writes output_path in input order; returns a summary."""
    from tqdm import tqdm

    items = read_jsonl(input_path)
    requests = []
    for index, (_, prompt) in enumerate(items):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        p = SamplingParams(params.temperature, params.top_p, params.top_k, request_seed(params.seed, index))
        requests.append(Request(str(index), ids, max_new_tokens, p))
    for index, req in enumerate(requests):
        try:
            engine.check(req)
        except ValueError as exc:
            raise InputError(f"{input_path}: line for id {items[index][0]!r}: {exc}") from None
    bar = tqdm(total=len(requests) * max_new_tokens, unit="tok", desc="generate", disable=not progress,
               file=sys.stderr)
    start = time.perf_counter()
    results = engine.generate(requests, on_tokens=lambda rid, toks: bar.update(len(toks)))
    seconds = time.perf_counter() - start
    bar.close()
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as out:
        for (rid, _), result in zip(items, results, strict=True):
            out.write(json.dumps(output_record(rid, tokenizer, result), ensure_ascii=False) + "\n")
    tokens = sum(len(r.token_ids) for r in results)
    rounds = sum(r.stats["rounds"] for r in results)
    return {"requests": len(results), "tokens": tokens, "seconds": seconds,
            "accepted_per_round": sum(r.stats["accepted_tokens"] for r in results) / max(1, rounds)}


class TextDeltas:
    """Turns committed tokens into text deltas: holds back incomplete UTF-8 and cuts at the first stop string."""

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0

    def feed(self, new: list[int]) -> tuple[str, bool]:
        """(text to send now, whether a stop string was reached)."""
        self.ids += new
        text = self.tokenizer.decode(self.ids)
        hits = [text.find(s, max(0, self.sent - max(map(len, self.stop)))) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        if hits:
            end = min(hits)
            delta, self.sent = text[self.sent:end], max(self.sent, end)
            return delta, True
        if text.endswith("\ufffd"):
            return "", False
        delta, self.sent = text[self.sent:], len(text)
        return delta, False


class StreamPrinter:
    """Prints a request's text as tokens arrive (whole characters only)."""

    def __init__(self, tokenizer, out=None):
        # sys.stdout as it is now, not at import: redirected or captured output must get the stream too
        self.out = sys.stdout if out is None else out
        self.deltas = TextDeltas(tokenizer)

    @property
    def printed(self) -> int:
        return self.deltas.sent

    def __call__(self, rid: str, tokens: list[int]) -> None:
        text, _ = self.deltas.feed(tokens)
        if text:
            self.out.write(text)
            self.out.flush()


def stream_prompt(engine, tokenizer, prompt: str, max_new_tokens: int, params: SamplingParams) -> Result:
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    req = Request("prompt", ids, max_new_tokens, params)
    engine.check(req)
    printer = StreamPrinter(tokenizer)
    (result,) = engine.generate([req], on_tokens=printer)
    rest = tokenizer.decode(result.token_ids)[printer.printed:]
    print(rest, flush=True)
    return result
