"""--device: the engine makes every tensor on the model's device (or, for host-side structures, explicitly on the
CPU), so it runs on CUDA as it runs here.

No GPU is needed to check that: with torch's default device set to "meta", any tensor made without an explicit
device lands on meta and fails as soon as it meets a real one (or is read back) -- the very bug a CUDA run would hit
as a CPU tensor meeting a CUDA one. The engine is built and run under that default and must give the normal run's
tokens, greedy and sampled, for plain decoding, suffix trees, fused drafters and the draft head, on the torch path
(what CUDA runs) and the packed CPU kernel path."""

import contextlib
import dataclasses

import pytest
import torch

from specfleet.engine import factory
from specfleet.engine.engine import Request
from specfleet.engine.models import ModelSet, check_device, checkpoint_dtype, resolve_device
from specfleet.engine.sampling import SamplingParams
from specfleet_kernels import cpu_gemm

PROMPTS = ([5, 6, 7, 8, 9, 10, 11, 12], [11, 12, 13, 14], [40, 41, 42, 43, 44, 45])
NEW_TOKENS = 16
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, seed=7)


@contextlib.contextmanager
def meta_default():
    """torch's default device is meta inside: a tensor made without a device cannot be used with real ones."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.fixture(scope="module")
def models(models_dir):
    return ModelSet.bundled(models_dir)


@pytest.fixture
def loads_on_cpu(monkeypatch):
    """Model loading (transformers, safetensors) is not the engine: it runs with the CPU default, and the engine
    itself, built around the loaded models, under meta."""
    load = factory.load_model

    def on_cpu(models, name):
        with torch.device("cpu"):
            return load(models, name)

    monkeypatch.setattr(factory, "load_model", on_cpu)


def _requests(sampled: bool) -> list[Request]:
    return [Request(f"r{i}", list(p), NEW_TOKENS, dataclasses.replace(SAMPLED, seed=SAMPLED.seed + i) if sampled
                    else SamplingParams(), ignore_eos=True) for i, p in enumerate(PROMPTS)]


def _run(models, proposer: str, sampled: bool, batch: int) -> list[list[int]]:
    # FixedK (no adaptive control): every round drafts, so each proposer's whole path runs
    engine = factory.build_engine(models, proposer, batch_size=batch, k=3, adaptive=False)
    return [r.token_ids for r in engine.generate(_requests(sampled))]


@pytest.mark.parametrize("matmul", ["torch", "packed"])
@pytest.mark.parametrize("proposer", ["none", "suffix", "fused", "head"])
def test_engine_makes_no_tensor_off_the_models_device(models, proposer, matmul, loads_on_cpu, monkeypatch):
    if proposer == "head" and models.head is None:
        pytest.skip("the bundled models have no draft head")
    if matmul == "torch":  # the path CUDA runs: torch's matmul and attention, no C kernel
        monkeypatch.setattr(cpu_gemm, "available", lambda: False)
    elif not cpu_gemm.available():
        pytest.skip(f"the CPU kernel is not available here: {cpu_gemm.unavailable_reason()}")
    for sampled in (False, True):
        batch = 2 if sampled else 3  # a batch that fits all requests, and one that admits one as another finishes
        want = _run(models, proposer, sampled, batch)
        with meta_default():
            got = _run(models, proposer, sampled, batch)
        assert got == want, f"{proposer} {'sampled' if sampled else 'greedy'}: output changed under a meta default"
        assert all(len(t) == NEW_TOKENS for t in got)


def test_the_meta_default_catches_a_tensor_made_without_a_device():
    with meta_default(), pytest.raises((RuntimeError, NotImplementedError)):
        (torch.arange(4) + torch.zeros(4, device="cpu")).tolist()


def test_device_names_are_checked():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", ""):
        with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N"):
            check_device(bad)
    with pytest.raises(ValueError, match="--device"):
        ModelSet(ModelSet.bundled("models").target, device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_is_refused_clearly_without_a_visible_device(models, device):
    with pytest.raises(ValueError) as exc:
        models.with_overrides(device=device)
    message = str(exc.value)
    assert message.startswith(f"--device {device}: no CUDA device is visible to torch (torch ")
    assert torch.__version__.split("+")[0] in message
    assert ("built without CUDA" if torch.version.cuda is None else "no GPU is visible") in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
def test_generate_refuses_cuda_with_the_option_named(tmp_path, capsys):
    from specfleet.cli.main import main

    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"id": "a", "prompt": "def f("}\n')
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--input", str(prompts), "--output", str(tmp_path / "out.jsonl"), "--device", "cuda"])
    assert "--device cuda: no CUDA device is visible to torch" in str(exc.value.code)


@pytest.mark.parametrize("argv", [["generate"], ["demo"], ["serve"], ["up"], ["profile"], ["bench", "engine"]],
                         ids=" ".join)
def test_help_of_every_command_with_dtype_names_device(argv, capsys):
    from specfleet.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--dtype" in out and "--device" in out


def test_bad_device_is_an_argument_error(capsys):
    from specfleet.cli.main import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["generate", "--prompt", "x", "--device", "gpu"])
    assert exc.value.code == 2
    assert "--device" in capsys.readouterr().err


def test_up_hands_children_one_resolved_device(models):
    args = models.with_overrides(device="auto", dtype="bfloat16").args()
    at = args.index("--device")
    assert args[at + 1] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert args[args.index("--dtype") + 1] == "bfloat16"


def test_auto_dtype_is_float32_on_the_cpu_and_the_checkpoints_on_cuda(models, tmp_path, monkeypatch):
    assert models.dtype_for(models.target) == torch.float32
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert checkpoint_dtype(folder) == "bfloat16"
    (folder / "config.json").write_text('{"dtype": "float16"}')
    assert checkpoint_dtype(folder) == "float16"
    (folder / "config.json").write_text("{}")
    assert checkpoint_dtype(folder) == "float32"
    (folder / "config.json").write_text('{"dtype": "bfloat16"}')
    on_cuda = ModelSet(folder, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert on_cuda.dtype_for(folder) == torch.bfloat16
    assert ModelSet(folder, device="cuda", dtype="float32").dtype_for(folder) == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
def test_gpu_check_stops_at_once_without_cuda(tmp_path, capsys):
    from specfleet.cli.main import main

    assert main(["bench", "gpu", "--output", str(tmp_path / "gpu.json")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is visible to torch" in err and "make gpu-check" in err
    assert not (tmp_path / "gpu.json").exists()
