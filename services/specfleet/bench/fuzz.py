"""`specfleet bench fuzz`: malformed and extreme inputs at volume (10,000 by default) against a live fleet's public
gRPC API (`Router.Complete` / `Generate`: protobuf field mutations, out-of-range numbers, huge repeated fields,
unicode, and byte-level damage of the encoded message) and its OpenAI-compatible HTTP front (`/v1/completions`,
`/v1/chat/completions`, `/v1/models/{id}`: wrong types, huge numbers, unicode, missing fields, broken JSON).

Every answer is classified. Right: a result (the input was valid), or a typed client error with a non-empty message
(gRPC INVALID_ARGUMENT, or RESOURCE_EXHAUSTED for a message over the size limit; HTTP 400 / 404 / 405 / 413 / 422 in
OpenAI's error shape). Wrong: UNKNOWN / INTERNAL / any other code, an HTTP 5xx, an error without a message, a stream
that breaks, a valid-looking answer to an input the router must refuse, or no answer within the deadline (a hang).
Cases are generated from one seed, so a failure is replayed by its index. Inputs that are valid but would generate
many tokens get their token count cut to 2 (a trailing `max_new_tokens` field: the last value of a protobuf scalar
wins), so the run stays about the inputs, not generation."""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

CUT_TOKENS = 2  # valid inputs generate at most this many tokens
DEADLINE_S = 60.0  # an answer later than this is a hang
INT32_MIN, INT32_MAX, INT64_MAX = -(2**31), 2**31 - 1, 2**63 - 1
GRPC_METHODS = ("/specfleet.api.v1.Router/Complete", "/specfleet.api.v1.Router/Generate")

# text that has broken servers: controls, NUL, lone-surrogate lookalikes (valid UTF-8), RTL, zero-width, combining
# marks, emoji with joiners, the BOM, non-characters, a very long word, template syntax (the chat template is Jinja)
TEXTS = ("", " ", "\x00", "\x00\x01\x02\x7f", "def f(x):\n    return x", "\u202e\u2066abc", "\u200b\u200d\ufeff",
         "e\u0301\u0301\u0301" * 50, "👩‍👩‍👧‍👦" * 20, "\uffff\ufffe", "\U0010ffff", "a" * 5000, "word " * 2000,
         "{{ raise_exception('x') }}", "{% for x in range(10**9) %}{% endfor %}", "<|endoftext|>" * 10,
         "\r\n\t\v\f", "ÿ" * 300, "中文字符" * 100, "\\u0000", "%s%n%x", "' OR 1=1 --", "../../etc/passwd")
FLOATS = (0.0, -0.0, 1.0, 0.7, -1.0, 1e-30, 1e-5, 1e-4, 1e38, 3.4e38, math.nan, math.inf, -math.inf, 1.0000001,
          1.4e-45, 2.0, 0.5)
INTS = (0, 1, 2, -1, 3, 1023, 1024, 1025, 8191, 8192, INT32_MAX, INT32_MIN, 2**16, -(2**16), 255)
DRAFTERS = ("suffix", "python", "", "x" * 300, "suffix\x00", "SUFFIX", "ü")


# ---------------------------------------------------------------- protobuf wire format, by hand

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers as protobuf sends them: ten bytes
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _len_field(field: int, data: bytes) -> bytes:
    return _tag(field, 2) + _varint(len(data)) + data


def _text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(TEXTS)
    # ASCII, then the BMP below the surrogates, then everything above them (protobuf strings must be valid UTF-8)
    return "".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(0x80, 0xD800),
                                   rng.randrange(0xE000, 0x110000)))) for _ in range(rng.randrange(0, 40)))


def _fields(rng: random.Random) -> dict:
    """A GenerateRequest's fields: a valid request with 1-3 fields mutated."""
    from specfleet.api.v1 import router_pb2

    f: dict = {"prompt_token_ids": [5, 6, 7], "max_new_tokens": 1}
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(("prompt", "prompt_token_ids", "max_new_tokens", "temperature", "top_p", "top_k", "seed",
                           "stop", "drafters", "request_id", "ignore_eos", "messages", "drop"))
        if name == "prompt":
            f["prompt"] = _text(rng)
            if rng.random() < 0.7:
                f.pop("prompt_token_ids", None)
        elif name == "prompt_token_ids":
            f["prompt_token_ids"] = rng.choice((
                [], [rng.choice(INTS)], [rng.randrange(INT32_MIN, INT32_MAX) for _ in range(rng.randrange(1, 8))],
                [5] * rng.choice((1023, 1024, 1025, 100_000)), [rng.randrange(0, 8192) for _ in range(50)]))
        elif name in ("max_new_tokens", "top_k"):
            f[name] = rng.choice(INTS)
        elif name in ("temperature", "top_p"):
            f[name] = rng.choice(FLOATS)
        elif name == "seed":
            f["seed"] = rng.choice((0, -1, INT64_MAX, -INT64_MAX - 1, rng.randrange(-(2**63), 2**63)))
        elif name == "stop":
            f["stop"] = [_text(rng)[:300] for _ in range(rng.choice((1, 2, 16, 17, 200)))]
        elif name == "drafters":
            f["drafters"] = [rng.choice(DRAFTERS) for _ in range(rng.choice((1, 2, 50)))]
        elif name == "request_id":
            f["request_id"] = rng.choice(("a", "fuzz-1", "x" * 129, "x" * 5000, "has space", "\x00", "ü" * 10,
                                          "\t", "id\n", _text(rng)))
        elif name == "ignore_eos":
            f["ignore_eos"] = True
        elif name == "messages":
            f.pop("prompt_token_ids", None)
            f["messages"] = [router_pb2.ChatMessage(role=rng.choice(("user", "system", "assistant", "", "tool",
                                                                      "USER", _text(rng)[:20])),
                                                    content=_text(rng))
                             for _ in range(rng.choice((0, 1, 2, 3, 500)))]
        else:  # drop a field the request needs
            f.pop(rng.choice(("prompt_token_ids", "max_new_tokens")), None)
    return f


def _damage(rng: random.Random, data: bytes) -> bytes:
    """Byte-level damage of an encoded request."""
    how = rng.randrange(9)
    b = bytearray(data)
    if how == 0 and b:  # flip bits
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif how == 1 and b:  # truncate
        del b[rng.randrange(len(b)):]
    elif how == 2:  # insert random bytes
        at = rng.randrange(len(b) + 1)
        b[at:at] = rng.randbytes(rng.randint(1, 16))
    elif how == 3:  # invalid UTF-8 in a string field (prompt, request_id, stop, drafters)
        b += _len_field(rng.choice((1, 2, 9, 10)), rng.choice((b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80",
                                                                b"\xf8\x88\x80\x80\x80", b"ok\x80")))
    elif how == 4:  # a known field with the wrong wire type
        b += rng.choice((_len_field(4, b"abc"), _tag(2, 0) + _varint(7), _tag(5, 0) + _varint(1), _tag(3, 5) +
                         b"\x01\x02\x03\x04", _tag(12, 0) + _varint(3)))
    elif how == 5:  # unknown fields, including huge field numbers and groups
        b += rng.choice((_tag(99, 0) + _varint(1), _len_field(536870911, b"x" * 10), _tag(15, 3) + _tag(15, 4),
                         _tag(15, 3)))
    elif how == 6:  # a length prefix longer than the message, or an over-long varint
        b += rng.choice((_tag(2, 2) + _varint(10**6) + b"abc", _tag(4, 0) + b"\xff" * 11, _tag(3, 2) + b"\x05\x01"))
    elif how == 7:  # packed ids with out-of-range varints (int32 from 64-bit values)
        ids = b"".join(_varint(rng.choice((2**40, -(2**40), 2**63, 2**32 + 5, -1))) for _ in range(3))
        b += _len_field(3, ids)
    else:  # random bytes
        b = bytearray(rng.randbytes(rng.randrange(0, 64)))
    return bytes(b)


def grpc_case(rng: random.Random) -> tuple[bytes, str]:
    """(the bytes of one request, a label saying what was done)."""
    from specfleet.api.v1 import router_pb2

    fields = _fields(rng)
    data = router_pb2.GenerateRequest(**fields).SerializeToString()
    label = "fields " + ",".join(sorted(fields))
    if rng.random() < 0.35:
        data = _damage(rng, data)
        label = "bytes"
    return data, label


def cut_long(data: bytes) -> bytes:
    """A request that parses with more than CUT_TOKENS tokens to make gets a trailing `max_new_tokens` field."""
    from specfleet.api.v1 import router_pb2

    try:
        parsed = router_pb2.GenerateRequest.FromString(data)
    except Exception:  # noqa: BLE001  (does not parse: the server must say so)
        return data
    if parsed.max_new_tokens > CUT_TOKENS:
        return data + _tag(4, 0) + _varint(CUT_TOKENS)
    return data


# ---------------------------------------------------------------- HTTP bodies

def _json_value(rng: random.Random, depth: int = 0):
    makers = (lambda: None, lambda: True, lambda: False, lambda: rng.choice(INTS),
              lambda: rng.choice((10**30, -(10**30), 10**400, 2**63, 2**64)),
              lambda: rng.choice((1.5, -0.0, 1e308, 5e-324)), lambda: _text(rng), lambda: "",
              lambda: [5, 6, 7], lambda: {"role": "user", "content": _text(rng)},
              lambda: [_json_value(rng, depth + 1) for _ in range(rng.randrange(4))],
              lambda: {_text(rng)[:8]: _json_value(rng, depth + 1) for _ in range(rng.randrange(4))})
    return makers[rng.randrange(len(makers) if depth < 3 else len(makers) - 2)]()


COMPLETION_FIELDS = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                     "stream_options", "model", "echo", "logprobs", "best_of", "suffix", "logit_bias",
                     "presence_penalty", "frequency_penalty", "ignore_eos", "user")
CHAT_FIELDS = ("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
               "stream_options", "model", "tools", "tool_choice", "response_format", "top_logprobs", "n")


def http_case(rng: random.Random) -> tuple[str, str, bytes, str]:
    """(method, path, body, label) of one HTTP request."""
    roll = rng.random()
    if roll < 0.05:  # model lookups and paths that do not exist
        return "GET", rng.choice(("/v1/models/", "/v1/models/x", "/v1/models/" + "%ff%fe", "/v1/models/..%2f",
                                  "/v1/nothing", "/v1/models/specfleet-target", "/v1/models/" + "a" * 3000)), b"", "get"
    if roll < 0.08:  # the wrong method
        return rng.choice(("GET", "PUT", "DELETE", "PATCH")), rng.choice(("/v1/completions", "/v1/chat/completions")), \
            b"{}", "method"
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict = ({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "def f(x):"})
    body["max_tokens"] = 1
    names = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(names)
        if rng.random() < 0.15:
            body.pop(name, None)  # missing (a required one, sometimes)
        elif name == "messages" and rng.random() < 0.6:
            body[name] = [{"role": rng.choice(("user", "system", "assistant", "tool", "", None, 5)),
                           "content": rng.choice((_text(rng), None, 7, ["a"], {"type": "text"}))}
                          for _ in range(rng.choice((0, 1, 2, 300)))]
        elif name == "prompt" and rng.random() < 0.5:
            body[name] = rng.choice((_text(rng), [rng.choice(INTS) for _ in range(3)], ["a", "b"], [[5, 6]],
                                     [5] * 1100, [2**40], [True]))
        else:
            body[name] = _json_value(rng)
    for name in ("max_tokens", "max_completion_tokens"):  # valid but long costs time: cut it
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and CUT_TOKENS < value <= INT32_MAX:
            body[name] = CUT_TOKENS
    label = f"{path} " + ",".join(sorted(body))
    data = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    roll = rng.random()
    if roll < 0.04:  # truncated JSON
        data, label = data[:rng.randrange(len(data))], f"{path} truncated"
    elif roll < 0.07:  # not UTF-8, or not JSON at all
        data, label = rng.choice((b"\xff\xfe" + data, data.replace(b'"', b"'"), b"", b"null", b"[]", b"1e999",
                                  b'{"prompt": NaN, "max_tokens": 1}', b'{"prompt": "\\ud800", "max_tokens": 1}',
                                  b"[" * 100_000, rng.randbytes(40))), f"{path} raw"
    elif roll < 0.075:  # over the body limit
        data, label = b'{"prompt": "' + b"a" * (1 << 20) + b'"}', f"{path} oversized"
    return "POST", path, data, label


# ---------------------------------------------------------------- sending and judging

@dataclass
class Verdict:
    channel: str  # "grpc" | "http"
    answer: str  # status code name / HTTP status
    ok: bool
    why: str = ""


def judge_grpc(send, data: bytes, label: str, vocab: int) -> Verdict:
    """Sends one request and says whether its answer is one a correct router may give."""
    import grpc

    from specfleet.api.v1 import router_pb2

    try:
        reply = send(data)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Verdict("grpc", "hang", False, f"{label}: no answer within {DEADLINE_S:g} s")
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED) and details.strip():
            return Verdict("grpc", code.name, True)
        return Verdict("grpc", code.name, False, f"{label}: {code.name} {details[:200]!r} for {data[:80]!r}")
    request = router_pb2.GenerateRequest.FromString(data)  # it was served, so it parses
    ids = list(request.prompt_token_ids)
    refusable = (request.max_new_tokens < 1 or (ids and (min(ids) < 0 or max(ids) >= vocab)) or
                 math.isnan(request.temperature) or request.temperature < 0 or 0 < request.temperature < 1e-4 or
                 math.isinf(request.temperature) or math.isnan(request.top_p) or
                 not 0 <= request.top_p <= 1 or request.top_k < 0)
    if refusable:
        return Verdict("grpc", "OK", False, f"{label}: accepted an invalid request {request!r:.200}")
    tokens = sum(len(m.token_ids) for m in reply)
    if tokens > request.max_new_tokens:
        return Verdict("grpc", "OK", False, f"{label}: {tokens} tokens for max_new_tokens {request.max_new_tokens}")
    return Verdict("grpc", "OK", True)


def judge_http(client, base: str, method: str, path: str, data: bytes, label: str) -> Verdict:
    import httpx

    headers = {"Content-Type": "application/json"}
    if len(data) > 1 << 19:  # the server may answer a body over its limit before reading it, then close: say so
        headers["Connection"] = "close"
    try:
        reply = client.request(method, base + path, content=data, headers=headers, timeout=DEADLINE_S)
    except httpx.TimeoutException:
        return Verdict("http", "hang", False, f"{label}: no answer within {DEADLINE_S:g} s")
    except httpx.HTTPError as exc:
        return Verdict("http", "broken", False, f"{label}: {type(exc).__name__} {exc}")
    status = reply.status_code
    if status >= 500:
        return Verdict("http", str(status), False, f"{label}: {status} {reply.text[:200]!r}")
    if status >= 400:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = ""
        if status in (400, 404, 405, 413, 422) and isinstance(message, str) and message.strip():
            return Verdict("http", str(status), True)
        return Verdict("http", str(status), False, f"{label}: {status} without an error message: {reply.text[:200]!r}")
    if status in (307, 308) and reply.headers.get("location"):  # a path with a trailing slash: redirected
        return Verdict("http", str(status), True)
    if status != 200:
        return Verdict("http", str(status), False, f"{label}: unexpected {status}")
    if reply.headers.get("content-type", "").startswith("text/event-stream"):  # a stream must end cleanly
        events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return Verdict("http", "200", False, f"{label}: the stream ended with {events[-1:]!r}")
    elif method == "POST" and "choices" not in reply.json():
        return Verdict("http", "200", False, f"{label}: no choices in {reply.text[:200]!r}")
    return Verdict("http", "200", True)


def fuzz(router_address: str, http_url: str | None, token: str | None, count: int = 10_000, seed: int = 0,
         workers: int = 8, vocab: int = 8192, http_share: float = 0.5, progress=None) -> dict:
    """Sends `count` generated inputs (about `http_share` of them HTTP when `http_url` is given) with `workers`
    at a time; returns the counts of answers by channel and code, and the wrong ones (with their case index)."""
    import grpc
    import httpx

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    identity = {"request_serializer": None, "response_deserializer": None}
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        if http_url and rng.random() < http_share:
            cases.append((i, "http", http_case(rng)))
        else:
            data, label = grpc_case(rng)
            cases.append((i, "grpc", (rng.randrange(2), cut_long(data), label)))
    answers: Counter = Counter()
    wrong: list[str] = []
    start = time.monotonic()
    from specfleet.api.v1 import router_pb2

    parse = router_pb2.GenerateResponse.FromString
    with grpc.insecure_channel(router_address, options=options) as channel, \
            httpx.Client(headers={"Authorization": f"Bearer {token}"} if token else {}) as client:
        complete = channel.unary_unary(GRPC_METHODS[0], **identity)
        generate = channel.unary_stream(GRPC_METHODS[1], **identity)

        def one(case) -> tuple[int, Verdict]:
            i, kind, payload = case
            if kind == "http":
                return i, judge_http(client, http_url, *payload)
            which, data, label = payload
            if which == 0:
                send = lambda d: [parse(complete(d, timeout=DEADLINE_S, metadata=metadata))]  # noqa: E731
            else:
                send = lambda d: [parse(m) for m in generate(d, timeout=DEADLINE_S, metadata=metadata)]  # noqa: E731
            return i, judge_grpc(send, data, f"{label} ({GRPC_METHODS[which].rsplit('/', 1)[1]})", vocab)

        with ThreadPoolExecutor(workers) as pool:
            for n, (i, verdict) in enumerate(pool.map(one, cases), 1):
                answers[f"{verdict.channel} {verdict.answer}"] += 1
                if not verdict.ok:
                    wrong.append(f"#{i} {verdict.why}")
                if progress and n % 1000 == 0:
                    progress(f"{n}/{count} sent, {len(wrong)} wrong, {time.monotonic() - start:.0f} s")
    grpc_sent = sum(v for k, v in answers.items() if k.startswith("grpc "))
    return {"seed": seed, "inputs": count, "grpc_inputs": grpc_sent, "http_inputs": count - grpc_sent,
            "answers": dict(sorted(answers.items())), "wrong_answers": len(wrong),
            "hangs": sum(v for k, v in answers.items() if k.endswith(" hang")), "wrong_examples": wrong[:20],
            "seconds": round(time.monotonic() - start, 1)}


def run(models_dir, output, count: int = 10_000, seed: int = 0, workers: int = 8, progress: bool = True) -> dict:
    """The benchmark: a ProcessFleet (suffix drafter, one verifier, the router with its HTTP front and a token) on
    its own Redis, `count` fuzzed inputs, then crashed processes and a normal generation; the result goes into
    `output` (bench/reliability.json) under "fuzz", every other key kept. The router's deadline per internal call is
    30 s (as in `bench reliability`'s load): valid prompts of up to 1,024 tokens, 8 at a time, on a 2-core machine
    took a verifier longer than the fault tests' 3 s, and the fuzz is about inputs, not overload."""
    import os
    import sys
    from pathlib import Path

    from specfleet.bench.reliability import PersistentRedis, ProcessFleet, stream_with_fault

    def say(text: str) -> None:
        if progress:
            print(f"[bench fuzz] {text}", file=sys.stderr, flush=True)

    token = os.urandom(12).hex()
    say("starting the fleet: drafter suffix, 1 verifier, router with its HTTP front (one process each), own Redis")
    with PersistentRedis() as redis, ProcessFleet(Path(models_dir), redis.url, pools=("suffix",), verifiers=1,
                                                  fusion=False, token=token, http=True, slots=16,
                                                  router_flags=("--rpc-timeout", "30")) as fleet:
        say(f"{count} inputs, seed {seed}, {workers} at a time")
        report = fuzz(fleet.router_address, fleet.http_url, token, count, seed, workers, progress=say)
        crashed = fleet.crashed()
        valid = stream_with_fault(fleet.router_address, [5, 6, 7], 4, token=token)
    report.update({"server_crashes": len(crashed), "crashed": crashed,
                   "valid_request_after": not valid.error and len(valid.tokens) > 0,
                   "config": {"fleet": "one `specfleet serve` process per service on loopback (drafter suffix, 1 "
                                       "verifier, router + HTTP front), own redis-server",
                              "workers": workers, "deadline_s": DEADLINE_S, "valid_inputs_cut_to_tokens": CUT_TOKENS,
                              "router_rpc_timeout_s": 30.0, "cpu_count": os.cpu_count()}})
    output = Path(output)
    existing = json.loads(output.read_text()) if output.exists() else {}
    existing["fuzz"] = report
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(existing, indent=2) + "\n")
    return report


def format_table(report: dict) -> str:
    lines = [f"inputs fuzzed {report['inputs']} (gRPC {report['grpc_inputs']}, HTTP {report['http_inputs']}) in "
             f"{report['seconds']} s: wrong answers {report['wrong_answers']} (hangs {report['hangs']}), server "
             f"crashes {report.get('server_crashes', 0)}, a normal request after: "
             f"{'served' if report.get('valid_request_after', True) else 'FAILED'}"]
    lines += [f"  {name:<28} {n:>6}" for name, n in report["answers"].items()]
    lines += [f"  wrong: {w}" for w in report["wrong_examples"]]
    return "\n".join(lines)
