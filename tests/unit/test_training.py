"""The training pipeline on a tiny model and tiny data (seconds): resuming is exact, drafters distil and skip."""

import json

import numpy as np
import pytest
import torch

from specfleet.training.corpus import DOMAINS
from specfleet.training.distill import DistillConfig, build_teacher_cache, train_drafter
from specfleet.training.train import Arch, RunConfig, train_target

from conftest import MODELS_DIR

TINY = Arch(hidden=32, layers=1, intermediate=64, heads=2)


@pytest.fixture
def tiny_tokens(tmp_path, tokenizer, held_out_text):
    out = tmp_path / "tokens"
    out.mkdir()
    ids = np.array(tokenizer(held_out_text["python"])["input_ids"], dtype=np.uint16)
    for domain in DOMAINS:
        for split in ("train", "val"):
            ids.tofile(out / f"{domain}.{split}.bin")
    return out


def _train(tmp_path, tokens, name, minutes):
    cfg = RunConfig(steps=4, batch=2, seq=32, lr=1e-3, warmup=2, seed=0, eval_every=2, checkpoint_minutes=0.0)
    return train_target(tokens, MODELS_DIR / "target", tmp_path / name, tmp_path / f"run-{name}", cfg,
                        minutes=minutes, device_name="cpu", arch=TINY)


def test_resumed_training_equals_uninterrupted(tmp_path, tiny_tokens):
    straight = _train(tmp_path, tiny_tokens, "straight", minutes=None)
    # The same run stopped at once by its time budget, then resumed to the end.
    assert _train(tmp_path, tiny_tokens, "resumed", minutes=0.0)["step"] == 0
    resumed = _train(tmp_path, tiny_tokens, "resumed", minutes=None)
    assert resumed["step"] == straight["step"] == 4
    a = torch.load(tmp_path / "run-straight" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "run-resumed" / "checkpoint.pt", weights_only=False)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    info = json.loads((tmp_path / "straight" / "training.json").read_text())
    assert info["role"] == "target" and info["tokens_seen"] > 0
    assert [h["step"] for h in info["history"]] == [2, 4]  # the loss curve travels with the weights


def test_continuing_exported_weights_remeasures_and_warms_up(tmp_path, tiny_tokens):
    """A clone has the exported weights but no checkpoint: training continues from them with the learning rate
    warmed up again (fresh Adam moments), and their loss re-measured on this machine's validation split rather
    than trusted from a corpus built elsewhere."""
    from specfleet.training.train import lr_at

    _train(tmp_path, tiny_tokens, "first", minutes=None)
    info_path = tmp_path / "first" / "training.json"
    info = json.loads(info_path.read_text())
    info["validation_loss"] = {d: 0.01 for d in DOMAINS}  # as if measured on another corpus
    info_path.write_text(json.dumps(info))
    cfg = RunConfig(steps=6, batch=2, seq=32, lr=1e-3, warmup=2, seed=0, eval_every=2, checkpoint_minutes=0.0)
    state = train_target(tiny_tokens, MODELS_DIR / "target", tmp_path / "first", tmp_path / "run-again", cfg,
                         minutes=None, device_name="cpu", arch=TINY)
    assert state["step"] == 6 and state["schedule_start"] == 4
    remeasured = [h for h in state["history"] if h.get("note")]
    assert [h["step"] for h in remeasured] == [4] and remeasured[0]["val"]["python"] > 0.01
    assert state["best_val"] <= np.mean(list(remeasured[0]["val"].values()))
    assert [h["step"] for h in state["history"]] == [2, 4, 4, 6]
    assert lr_at(4, 10, 1.0, 2, start=4) == 0.5 and lr_at(5, 10, 1.0, 2, start=4) == 1.0
    assert lr_at(10, 10, 1.0, 2, start=4) == pytest.approx(0.1) and lr_at(0, 10, 1.0, 2) == 0.5


def test_precision_choice():
    from specfleet.cli.train import PRECISIONS as CLI_PRECISIONS
    from specfleet.training.train import PRECISIONS, autocast, resolve_precision

    assert CLI_PRECISIONS == PRECISIONS
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("auto", cpu) in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", cpu)
    layer = torch.nn.Linear(4, 4)
    with autocast(cpu, "bf16"):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert layer(torch.ones(1, 4)).dtype == torch.float32


def test_on_policy_teacher_cache(tmp_path, tiny_tokens):
    """On-policy windows keep their corpus prompt and continue it with the target's own tokens (the greedy ones
    exactly its greedy continuation); the others stay corpus text; both losses train; a new recipe rebuilds."""
    from specfleet.training.acceptance import greedy_continuation
    from specfleet.training.distill import ON_POLICY_MODES, on_policy_rows
    from specfleet.training.train import load_model

    target_dir = tmp_path / "tiny-target"
    cfg = RunConfig(steps=2, batch=2, seq=32, lr=1e-3, warmup=1, seed=0, eval_every=2, checkpoint_minutes=1.0)
    train_target(tiny_tokens, MODELS_DIR / "target", target_dir, tmp_path / "run", cfg, minutes=None,
                 device_name="cpu", arch=TINY)
    dcfg = DistillConfig(windows_per_domain=40, seq=32, top_k=8, steps=2, batch=2, warmup=1, prompt_tokens=8,
                         on_policy=0.5)
    build_teacher_cache(target_dir, tiny_tokens, tmp_path / "cache", dcfg, device_name="cpu",
                        windows={"python": 40})
    on_policy = torch.load(tmp_path / "cache" / "python.pt", weights_only=False)
    build_teacher_cache(target_dir, tiny_tokens, tmp_path / "cache-off", DistillConfig(
        windows_per_domain=40, seq=32, top_k=8, steps=2, batch=2, warmup=1, prompt_tokens=8, on_policy=0.0),
        device_name="cpu", windows={"python": 40})
    build_off = torch.load(tmp_path / "cache-off" / "python.pt", weights_only=False)
    rows = on_policy_rows(40, 0.5)
    assert len(rows) == 20 and on_policy["recipe"]["on_policy"] == 0.5
    corpus, cached = build_off["inputs"].long(), on_policy["inputs"].long()
    others = [i for i in range(40) if i not in rows]
    assert torch.equal(cached[others], corpus[others]) and torch.equal(cached[:, :8], corpus[:, :8])
    assert not torch.equal(cached[rows], corpus[rows])
    greedy_rows = rows[ON_POLICY_MODES.index((0.0, 1.0))::len(ON_POLICY_MODES)]
    expected = greedy_continuation(load_model(target_dir), corpus[greedy_rows, :8], 24)
    assert torch.equal(cached[greedy_rows, 8:], expected)
    for loss in ("kl", "tv"):
        info = train_drafter("drafter-python", target_dir, tiny_tokens, tmp_path / "cache", tmp_path / loss,
                             DistillConfig(windows_per_domain=40, seq=32, top_k=8, steps=2, batch=2, warmup=1,
                                           prompt_tokens=8, on_policy=0.5, loss=loss), device_name="cpu", arch=TINY)
        assert info["run"]["loss"] == loss and info["run"]["on_policy"] == 0.5
    with pytest.raises(ValueError, match="on_policy"):
        DistillConfig(on_policy=1.5)
    with pytest.raises(ValueError, match="loss"):
        DistillConfig(loss="js")


def test_distillation_exports_and_skips_when_done(tmp_path, tiny_tokens):
    target_dir = tmp_path / "tiny-target"
    cfg = RunConfig(steps=2, batch=2, seq=32, lr=1e-3, warmup=1, seed=0, eval_every=2, checkpoint_minutes=1.0)
    train_target(tiny_tokens, MODELS_DIR / "target", target_dir, tmp_path / "run", cfg, minutes=None,
                 device_name="cpu", arch=TINY)
    dcfg = DistillConfig(windows_per_domain=4, seq=32, top_k=8, steps=3, batch=2, warmup=1, prompt_tokens=8)
    build_teacher_cache(target_dir, tiny_tokens, tmp_path / "cache", dcfg, device_name="cpu")
    info = train_drafter("drafter-python", target_dir, tiny_tokens, tmp_path / "cache", tmp_path / "out", dcfg,
                         device_name="cpu", arch=TINY)
    assert info["domains"] == ["python"] and info["tokens_seen"] == 3 * 2 * 32
    weights = tmp_path / "out" / "drafter-python" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = train_drafter("drafter-python", target_dir, tiny_tokens, tmp_path / "cache", tmp_path / "out", dcfg,
                          device_name="cpu", arch=TINY)
    assert again == info and weights.stat().st_mtime_ns == mtime


def test_engine_continuations_are_the_targets_own(load_model, tokenizer, held_out_text):
    """The CLI's on-policy generator (the engine's batched plain decoding) gives the target's greedy continuation,
    and reproducible samples of the requested length."""
    from specfleet.cli.train import _engine_continuations
    from specfleet.training.acceptance import greedy_continuation

    ids = tokenizer(held_out_text["python"], return_tensors="pt").input_ids[0]
    prompts = torch.stack([ids[i:i + 24] for i in (0, 300, 600)])
    generate = _engine_continuations(MODELS_DIR / "target", batch=4)
    assert torch.equal(generate(prompts, 12, 0.0, 1.0, 0), greedy_continuation(load_model("target"), prompts, 12))
    sampled = generate(prompts, 12, 0.8, 0.95, 7)
    assert sampled.shape == (3, 12) and torch.equal(sampled, generate(prompts, 12, 0.8, 0.95, 7))


def test_head_trains_exports_and_continues_on_a_fresh_machine(tmp_path, tiny_tokens):
    """The draft head trains on the bundled target's features, exports a head the engine can read, and a clone
    with the exported head but no checkpoint continues from it (schedule warmed up again from its step)."""
    from specfleet.training.head import HeadRunConfig, read_head, train_head

    cfg = HeadRunConfig(steps=3, batch=2, seq=32, warmup=1, eval_every=2, checkpoint_minutes=0.0)
    target = MODELS_DIR / "target"
    state = train_head(tiny_tokens, target, tmp_path / "head", tmp_path / "run", cfg, minutes=None,
                       device_name="cpu", precision="fp32")
    assert state["step"] == 3 and [h["step"] for h in state["history"]] == [2, 3]
    _, weights, info = read_head(tmp_path / "head", target)
    assert info["tokens_seen"] > 0 and len(info["validation"]["python"]["top1"]) == cfg.passes
    longer = HeadRunConfig(steps=4, batch=2, seq=32, warmup=1, eval_every=2, checkpoint_minutes=0.0)
    again = train_head(tiny_tokens, target, tmp_path / "head", tmp_path / "run-fresh-machine", longer,
                       minutes=None, device_name="cpu", precision="fp32")
    assert again["step"] == 4 and again["schedule_start"] == info["step"]
