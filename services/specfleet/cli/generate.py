"""`specfleet generate`: JSONL in, JSONL out through the speculative engine (the contract other tools rely on),
or one prompt streamed to the terminal."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from specfleet.cli.options import (
    engine_from_args,
    engine_options,
    positive_int,
    sampling_from_args,
)
from specfleet.engine.engine import Request, Result
from specfleet.engine.sampling import SamplingParams
from specfleet.runtime.text import TextDeltas


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


def cmd_generate(args) -> int:
    if (args.prompt is None) == (args.input is None):
        sys.exit("error: give either --prompt TEXT (streams to the terminal) or --input FILE.jsonl with --output")
    if args.input is not None and args.output is None:
        sys.exit("error: --input needs --output FILE.jsonl for the results")
    if args.input is not None:
        try:
            read_jsonl(args.input)  # fail on a bad file before loading any model
        except InputError as exc:
            sys.exit(f"error: {exc}")
    engine, tok = engine_from_args(args, args.batch_size if args.input else 1)
    try:
        if args.prompt is not None:
            if not args.prompt:
                sys.exit("error: the prompt is empty; give some text to continue")
            start = time.perf_counter()
            result = stream_prompt(engine, tok, args.prompt, args.max_new_tokens, sampling_from_args(args))
            seconds = time.perf_counter() - start
            n = len(result.token_ids)
            print(f"[{n} tokens in {seconds:.2f}s, {n / seconds:.1f} tok/s, "
                  f"{result.stats['accepted_per_round']:.2f} drafted tokens accepted per round]", file=sys.stderr)
        else:
            summary = run_jsonl(engine, tok, args.input, args.output, args.max_new_tokens, sampling_from_args(args),
                                progress=not args.quiet)
            print(f"wrote {summary['requests']} results to {args.output}: {summary['tokens']} tokens in "
                  f"{summary['seconds']:.1f}s ({summary['tokens'] / summary['seconds']:.1f} tok/s), "
                  f"{summary['accepted_per_round']:.2f} drafted tokens accepted per round", file=sys.stderr)
    except (InputError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    return 0



def add_parser(sub, fmt) -> None:
    p = sub.add_parser("generate", help="generate with speculative decoding: one prompt streamed, or JSONL in/out",
                       formatter_class=fmt,
                       description="Continue prompts with the bundled target, drafting with the chosen proposer; the "
                                   "output equals the target's own decoding (greedy by default; --temperature > 0 "
                                   "samples from the target's distribution). --prompt streams one continuation; "
                                   "--input reads lines {\"id\": ..., \"prompt\": \"...\"} and --output gets lines "
                                   "{\"id\", \"text\", \"token_ids\", \"finish_reason\", \"stats\"}.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text to continue, streamed to stdout")
    src.add_argument("--input", type=Path, help="JSONL file of prompts")
    p.add_argument("--output", type=Path, help="JSONL file for the results (with --input)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="requests verified together (with --input)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    engine_options(p)
    p.set_defaults(func=cmd_generate)
