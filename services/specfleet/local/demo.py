"""`specfleet demo` (what `make demo` runs): starts the whole fleet with `specfleet up` (router, fusion, drafter pools,
a verifier and an embedded Redis, as local processes), streams a few generations through the client SDK, prints a
table of what each took, and stops the fleet. `--engine` runs the same prompts in this process instead."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO_PROMPTS = (
    "def read_config(path):\n    \"\"\"Read a configuration file and return a dict.\"\"\"\n",
    "The request handler validates its input before",
    "#include <stdint.h>\n\nstatic inline uint32_t",
)


def _wait_until_up(proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    shown = 0
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if "specfleet is up" in text:
            print(" ready.", flush=True)
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the fleet exited with code {proc.returncode}; its log:\n{text[-3000:]}")
        started = text.count("serving on")
        if started > shown:
            print("." * (started - shown), end="", flush=True)  # one dot per service up
            shown = started
        time.sleep(0.25)
    raise TimeoutError(f"the fleet was not up within {timeout:.0f}s; see {log_path}")


def run_fleet_demo(args) -> int:
    from specfleet.engine.models import ModelSet
    from specfleet.local.up import kv_args
    from specfleet.sdk import Client
    from specfleet.state.embedded import free_port

    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"specfleet-demo-{os.getpid()}.log"
    models = ModelSet.bundled(args.models).with_overrides(args.target, args.drafter, args.dtype,
                                                          device=args.device)  # ValueError: said
    cmd = [sys.executable, "-m", "specfleet.cli", "up", "--grpc-port", str(port), "--http-port", "-1",
           "--models", str(args.models), *models.args(), *kv_args(args), "--pools", args.pools, "--k", str(args.k),
           "--key-prefix", f"sfdemo-{os.getpid()}"]
    if args.redis_url:
        cmd += ["--redis-url", args.redis_url]
    if not args.adaptive:
        cmd.append("--no-adaptive")
    pools = args.pools.split(",")
    print(f"specfleet demo: starting the fleet (router, fusion, drafter pools {', '.join(pools)}, a verifier"
          f"{'' if args.redis_url else ', an embedded Redis'}) as local processes; log: {log_path}", flush=True)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rows = []
    try:
        _wait_until_up(proc, log_path, args.ready_timeout)
        mode = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top-p {args.top_p}"
        print(f"Streaming {len(DEMO_PROMPTS)} generations through the router ({mode}); the output is exactly the "
              f"target model's own.\n")
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            for prompt in DEMO_PROMPTS:
                print("=" * 72)
                print(prompt, end="", flush=True)
                start = time.perf_counter()
                usage, tokens = None, 0
                for chunk in client.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                             top_p=args.top_p, top_k=args.top_k, seed=args.seed):
                    print(chunk.text, end="", flush=True)
                    tokens += len(chunk.token_ids)
                    usage = chunk.usage or usage
                rows.append((prompt.splitlines()[0][:28], tokens, time.perf_counter() - start, usage))
                print("\n")
        print(stats_table(rows))
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # `up` stops every service cleanly on SIGINT
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def stats_table(rows) -> str:
    """One line per generation: tokens, time, speed, target forward passes (rounds) and drafted tokens accepted."""
    head = f"{'prompt':<30}{'tokens':>7}{'seconds':>9}{'tok/s':>8}{'rounds':>8}{'drafted':>9}{'accepted':>10}" \
           f"{'tokens/round':>14}"
    lines = [head, "-" * len(head)]
    for name, tokens, seconds, usage in rows:
        rounds = usage.rounds if usage else 0
        lines.append(f"{name!r:<30}{tokens:>7}{seconds:>9.2f}{tokens / max(seconds, 1e-9):>8.1f}{rounds:>8}"
                     f"{usage.draft_tokens if usage else 0:>9}{usage.accepted_tokens if usage else 0:>10}"
                     f"{tokens / max(rounds, 1):>14.2f}")
    return "\n".join(lines)
