"""The fleet's round trip hop by hop (`specfleet bench fleet --stages overhead`): streams with `round_timings` on,
so every message carries where its round's time went (router planning, drafter RPCs, fusion, the verify queue, the
verifier's batch wait, forward and commit, the answer's way back, the router's bookkeeping and the delivery to the
client), then p50 / p99 per hop, with the drafting and verify-forward compute apart from the orchestration around
them. Run with the bundled models and with the smallest ones (`tiny_models`: one layer, random weights, the bundled
tokenizer), so that compute does not hide what the orchestration costs."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
from pathlib import Path

# (hop, kind, what it is); compute is the models' own work, the rest is what the fleet adds around it
HOPS = (
    ("plan", "orchestration", "router: speculation control and expertise routing"),
    ("draft_rpc", "orchestration", "router -> drafters -> router, less the drafters' own drafting time"),
    ("draft_compute", "compute", "drafting, as the slowest chosen drafter reports it"),
    ("fuse", "orchestration", "router -> fusion -> router"),
    ("queue", "orchestration", "router send -> verifier pick-up (stream enqueue and read, or gRPC's way in)"),
    ("batch_wait", "orchestration", "verifier: waiting for the round's batch (batcher window, other forwards)"),
    ("verify_forward", "compute", "verifier: the target's forward for the batch"),
    ("commit", "orchestration", "verifier: the round's atomic, idempotent commit to Redis (gRPC verify queue; with "
                                "the stream queue the commit is the answer's own Redis script: counted in answer)"),
    ("verifier_other", "orchestration", "verifier: validation, wire decoding, the answer's message"),
    ("answer", "orchestration", "verifier's answer -> router (stream: one Redis script commits, answers and "
                                "acknowledges the round, then the router's read wakes; or the gRPC response)"),
    ("account", "orchestration", "router: feedback, counters, detokenising, the stream message"),
    ("deliver", "orchestration", "router's message -> the client has it"),
    ("loop", "orchestration", "the rest of the round as the client sees it (the router's loop between rounds)"),
)
SUMMARY = (("round", "the round as the client sees it: the gap between two streamed messages"),
           ("compute", "draft_compute + verify_forward"),
           ("orchestration", "round - compute: what the fleet adds to the models' work"))
# the round trip in turn: no draft made ahead of its round, no DSI round beside it, k fixed
HOP_FLAGS = ["--no-adaptive", "--no-pipeline", "--no-dsi"]


def tiny_models(models_dir: Path, out: Path, pools: tuple[str, ...] = ("python", "prose", "c"), layers: int = 1,
                hidden: int = 64) -> Path:
    """The smallest models the fleet serves, laid out like models/ (target/, drafter-NAME/): Llama, `layers`
    layers of width `hidden`, random weights (seeded), the bundled tokenizer and its vocabulary."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    bundled = AutoConfig.from_pretrained(str(models_dir / "target"))
    for seed, name in enumerate(("target", *(f"drafter-{p}" for p in pools))):
        folder = out / name
        config = LlamaConfig(vocab_size=bundled.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=bundled.max_position_embeddings, tie_word_embeddings=True,
                             bos_token_id=bundled.bos_token_id, eos_token_id=bundled.eos_token_id,
                             pad_token_id=bundled.pad_token_id, initializer_range=0.5)
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(models_dir / "target" / file, folder / file)
    return out


async def timed_stream(address: str, ids: list[int], new_tokens: int) -> tuple[list[int], list[dict]]:
    """One request with round timings on (end of text ignored, so every request runs its length); returns its
    tokens and one record per round, in seconds: the router's and verifier's timings, the client's receipt time
    and the gap since the message before (None for the first)."""
    import grpc

    from specfleet.api.v1 import router_pb2, router_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        tokens, rounds, last = [], [], None
        call = stub.Generate(router_pb2.GenerateRequest(prompt_token_ids=ids, max_new_tokens=new_tokens,
                                                         ignore_eos=True, round_timings=True), timeout=600)
        async for message in call:
            now, wall = time.perf_counter(), time.time()
            tokens += message.token_ids
            if message.HasField("timings"):
                t = message.timings
                rounds.append({"gap": None if last is None else now - last, "received_unix": wall,
                               **{f.name: v for f, v in t.ListFields()}})
            last = now
        return tokens, rounds


def hops_of(record: dict) -> dict[str, float] | None:
    """One round's hops in seconds (None for a round without a gap: the first of its stream)."""
    g = record.get
    if record["gap"] is None:
        return None
    draft_compute = g("draft_compute_s", 0.0)
    hops = {"plan": g("plan_s", 0.0), "draft_rpc": max(0.0, g("draft_s", 0.0) - draft_compute),
            "draft_compute": draft_compute, "fuse": g("fuse_s", 0.0), "queue": g("queue_s", 0.0),
            "batch_wait": g("batch_wait_s", 0.0), "verify_forward": g("forward_s", 0.0), "commit": g("commit_s", 0.0),
            "verifier_other": max(0.0, g("verifier_s", 0.0) - g("batch_wait_s", 0.0) - g("forward_s", 0.0)
                                  - g("commit_s", 0.0)),
            "answer": max(0.0, g("verify_s", 0.0) - g("queue_s", 0.0) - g("verifier_s", 0.0)),
            "account": g("account_s", 0.0), "deliver": max(0.0, record["received_unix"] - g("sent_unix", 0.0))}
    measured = (g("plan_s", 0.0) + g("draft_s", 0.0) + g("fuse_s", 0.0) + g("verify_s", 0.0) + g("account_s", 0.0)
                + hops["deliver"])
    hops["loop"] = max(0.0, record["gap"] - measured)
    hops["round"] = record["gap"]
    hops["compute"] = draft_compute + hops["verify_forward"]
    hops["orchestration"] = max(0.0, record["gap"] - hops["compute"])
    return hops


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def hop_table(records: list[dict]) -> dict[str, dict[str, float]]:
    """{hop: {p50, p99, mean}} in ms over the rounds that have a gap."""
    rows = [h for h in map(hops_of, records) if h is not None]
    if not rows:
        raise ValueError("no round with timings after the first of its stream: ask for more tokens per request")
    table = {}
    for name in [h for h, _, _ in HOPS] + [s for s, _ in SUMMARY]:
        values = [r[name] for r in rows]
        table[name] = {"p50": round(_percentile(values, 0.5) * 1e3, 3),
                       "p99": round(_percentile(values, 0.99) * 1e3, 3),
                       "mean": round(statistics.fmean(values) * 1e3, 3)}
    return table


def profile(address: str, prompts: list[list[int]], new_tokens: int, concurrency: int) -> dict:
    """The hop table of `prompts` streamed `concurrency` at a time through the router at `address`, with the
    outputs for the caller's identity check."""
    async def wave(batch):
        return await asyncio.gather(*(timed_stream(address, ids, new_tokens) for ids in batch))

    asyncio.run(wave(prompts[:min(2, len(prompts))]))  # warm-up: channels, caches
    outputs, records = [], []
    for i in range(0, len(prompts), concurrency):
        for tokens, rounds in asyncio.run(wave(prompts[i:i + concurrency])):
            outputs.append(tokens)
            records += rounds
    table = hop_table(records)
    batch = [r.get("batch", 0) for r in records]
    return {"concurrency": concurrency, "rounds": len(records), "mean_verify_batch": round(statistics.fmean(batch), 2),
            "hops_ms": table, "outputs": outputs}


def format_hops(name: str, entry: dict) -> list[str]:
    lines = [f"round trip hop by hop, {name} models ({entry['models']}), `specfleet up {' '.join(entry['flags'])}`",
             f"{'hop':<16}{'kind':<15}" + "".join(f"{'c=' + str(c['concurrency']) + ' p50':>12}{'p99':>9}"
                                                 for c in entry["runs"])]
    kinds = {h: k for h, k, _ in HOPS}
    for hop in [h for h, _, _ in HOPS] + [s for s, _ in SUMMARY]:
        lines.append(f"{hop:<16}{kinds.get(hop, 'total'):<15}" + "".join(
            f"{c['hops_ms'][hop]['p50']:>12.3f}{c['hops_ms'][hop]['p99']:>9.3f}" for c in entry["runs"]))
    lines.append("identical to the target's plain decoding: " + ", ".join(
        f"c={c['concurrency']} {c['identical_outputs']}" for c in entry["runs"]))
    return lines
