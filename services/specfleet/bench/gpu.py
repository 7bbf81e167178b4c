"""`specfleet bench gpu` (`make gpu-check`): what `--device cuda` needs checked on a real GPU, in one run of at most
about 8 minutes, with the result in bench/gpu.json.

1. the CUDA tests: the Triton kernels against the reference (tests/unit/test_kernels_triton.py), the kernel
   dispatch (test_kernels_dispatch.py), and the engine on the device (test_device_cuda.py: bfloat16 greedy parity
   with Hugging Face `generate` on CUDA for tiny checkpoints of every supported family, plain and speculative; the
   bundled models greedy and sampled for every proposer);
2. the engine table on the device: speculative (fused) against plain decoding at batch 1, 8 and 32, greedy and
   sampled, with `specfleet bench engine`'s machinery (Hugging Face's rows beside it, and its lossless check).

Without a CUDA device it stops at once, exit status 2, saying so. Needs a checkout (the tests live in tests/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CUDA_TESTS = ("tests/unit/test_kernels_triton.py", "tests/unit/test_kernels_dispatch.py",
              "tests/unit/test_device_cuda.py")
BUDGET_S = 480  # the whole check: `make gpu-check` must finish within 8 minutes
TESTS_TIMEOUT_S = 240
ENGINE_BATCHES = (1, 8, 32)


def no_cuda_reason() -> str | None:
    """Why this machine cannot run the check (None when it can)."""
    import torch

    if torch.cuda.is_available():
        return None
    built = f"built with CUDA {torch.version.cuda}, but no GPU is visible" if torch.version.cuda else \
        "built without CUDA"
    return (f"no CUDA device is visible to torch (torch {torch.__version__.split('+')[0]}, {built}): "
            "`make gpu-check` runs on a machine with an NVIDIA GPU and a CUDA build of torch")


def run_tests(repo: Path, timeout_s: float, device: str = "cuda") -> dict:
    """The CUDA tests in one pytest process (test_device_cuda.py on `device`); their summary line and exit status."""
    paths = os.pathsep.join(str(repo / p) for p in ("services", "operator", "kernels", "tests"))
    env = {**os.environ, "PYTHONPATH": paths + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1",
           "SPECFLEET_TEST_DEVICE": device}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TESTS],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=timeout_s)
        out, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), 124
        out += f"\n(timed out after {timeout_s:.0f} s)"
    lines = [line for line in out.strip().splitlines() if line.strip()]
    skipped = [line for line in lines if line.startswith("SKIPPED")]  # -rs: why each skip (none expected on a GPU)
    return {"command": f"pytest -q {' '.join(CUDA_TESTS)}", "exit_status": rc,
            "summary": lines[-1] if lines else "", "seconds": round(time.perf_counter() - start, 1),
            "skipped": skipped, "triton_ran": not any("test_kernels_triton" in line for line in skipped),
            "tail": lines[-40:]}


def run(models_dir: Path, output: Path, repo: Path, new_tokens: int = 64, limit: int = 16,
        batches: tuple[int, ...] = ENGINE_BATCHES, device: str = "cuda") -> dict:
    import torch

    from specfleet.bench.engine_bench import _device_name, format_table
    from specfleet.bench.engine_bench import run as engine_run

    start = time.perf_counter()
    report: dict = {"device": _device_name(torch.device(device)), "torch": torch.__version__,
                    "cuda": torch.version.cuda}
    report["tests"] = run_tests(repo, TESTS_TIMEOUT_S, device)
    print(f"CUDA tests: {report['tests']['summary']} ({report['tests']['seconds']} s)", flush=True)
    for line in report["tests"]["skipped"]:
        print(f"  warning: {line}", flush=True)  # e.g. triton not installed: the Triton kernels went untested
    engine_out = output.with_name(output.stem + "-engine.json")
    try:
        engine = engine_run(models_dir, None, new_tokens, limit, engine_out, progress=False, batches=batches,
                            systems=("specfleet-fused",), device=device)
        report["engine"] = engine
        print(format_table(engine), flush=True)
    except Exception as exc:  # the table is part of the check: its failure is reported, not hidden
        report["engine"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"engine table failed: {report['engine']['error']}", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["within_budget"] = report["seconds"] <= BUDGET_S
    # greedy rows equal to the reference token for token: on a GPU a near-tie may flip (the tests allow for it)
    report["greedy_identical"] = _lossless(report)
    report["ok"] = report["tests"]["exit_status"] == 0 and "error" not in report["engine"]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _lossless(report: dict) -> bool:
    """Every greedy row of the engine table gave the reference's output (bench engine's identical_* fields)."""
    for row in report["engine"].get("results", []):
        for key in ("identical_to_hf_greedy", "identical_to_plain"):
            if key in row:
                same, total = row[key].split("/")
                if same != total:
                    return False
    return True
