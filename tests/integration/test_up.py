"""`specfleet up` end to end as real processes: the fleet becomes ready, the SDK gets the target's own greedy output
through it, the HTTP front lists the served model name, and Ctrl-C stops every process; a child that cannot start
stops the whole start-up at once, named, with its last log lines."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import torch

from specfleet.sdk import Client
from specfleet.state.embedded import free_port


def test_up_serves_the_target_greedy_output_and_stops_cleanly(load_model, tokenizer):
    port = free_port()
    prefix = f"sftest-up-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "specfleet.cli", "up", "--grpc-port", str(port), "--pools", "python,suffix",
           "--redis-url", "redis://127.0.0.1:6379/0", "--key-prefix", prefix, "--slots", "4", "--grace", "2",
           "--http-port", "0", "--served-model-name", "fib-model"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "specfleet is up" in line:
                break
        assert any("specfleet is up" in line for line in lines), "".join(lines[-30:])
        prompt = "def parse_args(argv):\n    parser = argparse.ArgumentParser("
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            result = client.complete(prompt, max_new_tokens=16)
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            want = load_model("target").generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16,
                                                 pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        assert list(result.token_ids) == want
        http = next(line for line in lines if "specfleet is up" in line).split("http://")[1].split("/v1")[0]
        import httpx

        reply = httpx.post(f"http://{http}/v1/completions", json={"model": "fib-model", "prompt": prompt,
                                                                   "max_tokens": 16, "temperature": 0}, timeout=60)
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == tokenizer.decode(want)
        assert [m["id"] for m in httpx.get(f"http://{http}/v1/models", timeout=10).json()["data"]] == ["fib-model"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole fleet: nothing may outlive the test
            raise
    assert proc.returncode == 0, rest[-2000:]
    with socket.socket() as s:  # the router's port is free again: nothing left listening
        s.bind(("127.0.0.1", port))
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def test_up_serves_models_given_by_path(tmp_path, models_dir):
    """A user's own checkpoints through the whole fleet: a Qwen2.5-shaped target and a Mistral-shaped drafter under
    a free name (`--target PATH --drafter NAME=PATH --pools NAME,suffix`); greedy output equals Hugging Face's."""
    from tiny_families import hf_generate, load, with_tokenizer

    target = with_tokenizer("qwen2.5", tmp_path / "target", models_dir)
    drafter = with_tokenizer("mistral", tmp_path / "drafter", models_dir, num_hidden_layers=1)
    port = free_port()
    prefix = f"sftest-upbyo-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "specfleet.cli", "up", "--grpc-port", str(port), "--target", str(target),
           "--drafter", f"my-small={drafter}", "--pools", "my-small,suffix", "--redis-url", "redis://127.0.0.1:6379/0",
           "--key-prefix", prefix, "--slots", "2", "--grace", "1", "--http-port", "-1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        lines = []
        while not any("specfleet is up" in line for line in lines[-1:]):
            lines.append(proc.stdout.readline())
            assert lines[-1] or proc.poll() is None, "".join(lines[-30:])
        prompt_ids = list(range(100, 120))
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            result = client.complete(prompt_token_ids=prompt_ids, max_new_tokens=12, ignore_eos=True)
        assert [list(result.token_ids)] == hf_generate(load(target), [prompt_ids], 12).tolist()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


def test_demo_streams_through_the_fleet_and_prints_stats():
    """`make demo`'s command: starts `up`, streams the demo prompts through the SDK, prints the stats table, stops."""
    cmd = [sys.executable, "-m", "specfleet.cli", "demo", "--pools", "suffix", "--max-new-tokens", "8",
           "--redis-url", "redis://127.0.0.1:6379/0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = done.stdout.split("tokens/round")[1].strip().splitlines()
    assert len(table) == 1 + 3  # the rule and one row per demo prompt
    assert all(int(row.split()[-7]) == 8 for row in table[1:])  # 8 tokens each


def test_up_refuses_bad_models_before_starting_anything(models_dir, tmp_path):
    """A drafter folder whose config cannot be read, or whose vocabulary differs from the target's, stops `up`
    before any child starts, with a message naming it."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    other = tmp_path / "other"
    other.mkdir()
    config = (models_dir / "drafter-python" / "config.json").read_text()
    (other / "config.json").write_text(config.replace('"vocab_size": 8192', '"vocab_size": 9000'))
    for drafter, message in ((broken, f"cannot read {broken / 'config.json'}"), (other, "vocab_size=9000")):
        cmd = [sys.executable, "-m", "specfleet.cli", "up", "--grpc-port", str(free_port()), "--pools", "mine",
               "--drafter", f"mine={drafter}", "--redis-url", "redis://127.0.0.1:6379/0", "--http-port", "-1"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and message in done.stderr, done.stderr[-2000:]


def test_up_fails_fast_when_a_child_cannot_start(models_dir, tmp_path):
    """A drafter whose model folder is broken exits during start-up: `up` stops the rest and exits 1 at once (long
    before its ready timeout), naming the child and showing its last lines."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "target").symlink_to(models_dir / "target")
    (models / "drafter-python").mkdir()  # a valid config (it passes the checks before start-up), no weights
    (models / "drafter-python" / "config.json").write_text((models_dir / "drafter-python" / "config.json").read_text())
    prefix = f"sftest-upfail-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "specfleet.cli", "up", "--grpc-port", str(free_port()), "--pools", "python",
           "--models", str(models), "--redis-url", "redis://127.0.0.1:6379/0", "--key-prefix", prefix,
           "--slots", "2", "--grace", "1", "--http-port", "-1", "--ready-timeout", "1200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=300)  # a quarter of the ready timeout: `up` did not wait it out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("`up` kept waiting after its drafter exited")
    assert proc.returncode == 1, out[-2000:] + err[-2000:]
    assert time.monotonic() - started < 300
    assert "error: drafter-python exited with code 1 during start-up" in err, err[-2000:]
    assert "drafter-python" in err.split("its last lines:")[1], err[-2000:]  # why it exited, from its own log
