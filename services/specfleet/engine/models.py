"""Which checkpoints a fleet or an engine runs: the target and named drafters, each a Hugging Face folder.

The default is the bundled family (`models/target`, `models/drafter-NAME`); `--target PATH` and `--drafter
NAME=PATH` replace or add members with any supported checkpoint (Llama, Mistral, Qwen2, Qwen3; see engine/llama.py).
Drafters must speak the target's vocabulary: `check_compatible` refuses a drafter whose vocabulary size or tokenizer
differs from the target's, naming both, before any request is served.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")  # a DNS label: it names pods and Redis keys too
MODEL_FREE = ("suffix", "ngram")  # drafter pools that need no model
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")  # --device: auto (cuda when torch sees one, else cpu)


def check_device_name(device: str) -> None:
    """Raises ValueError naming --device unless `device` is auto, cpu, cuda or cuda:N (nothing about the machine)."""
    if not isinstance(device, str) or not DEVICE.match(device):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def check_device(device: str) -> None:
    """Raises ValueError naming --device unless `device` is auto, cpu, cuda or cuda:N, and -- for cuda -- torch
    sees a CUDA device (and that index)."""
    check_device_name(device)
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}, but no GPU is visible" if torch.version.cuda else \
            "built without CUDA"
        raise ValueError(f"--device {device}: no CUDA device is visible to torch (torch "
                         f"{torch.__version__.split('+')[0]}, {built}); use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")


def resolve_device(device: str) -> str:
    """auto -> cuda when torch sees a CUDA device, else cpu; anything else checked (check_device) and kept."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    return device


def checkpoint_dtype(path: Path) -> str:
    """The dtype a Hugging Face folder's config.json records (`dtype` or `torch_dtype`), float32 when it records
    none or one the runner does not take."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in DTYPES[1:] else "float32"


@dataclass(frozen=True)
class ModelSet:
    """The target's folder and the drafters' folders by name (names without the `drafter-` prefix)."""

    target: Path
    drafters: dict[str, Path] = field(default_factory=dict)
    dtype: str = "auto"  # weights, activations and KV cache: auto (float32 on the CPU, the checkpoint's on CUDA),
    # float32, bfloat16, float16
    head: Path | None = None  # a draft head trained for this target (training/head.py), the drafter named "head"
    device: str = "cpu"  # where every model of the set runs: cpu, cuda, cuda:N, or auto (cuda when torch sees one)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_device_name(self.device)

    @property
    def torch_device(self):
        """The torch.device the models load on: auto resolved; ValueError (naming --device) for a CUDA device torch
        cannot see."""
        import torch

        return torch.device(resolve_device(self.device))

    @property
    def torch_dtype(self):
        """The dtype of the target (dtype_for(target))."""
        return self.dtype_for(self.target)

    def dtype_for(self, path: Path):
        """The torch dtype a member loads in: the one asked for; auto is float32 on the CPU and the checkpoint's own
        (config.json) on CUDA."""
        import torch

        name = self.dtype
        if name == "auto":
            name = "float32" if self.torch_device.type == "cpu" else checkpoint_dtype(path)
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]

    @classmethod
    def bundled(cls, models_dir: Path) -> ModelSet:
        """The folder layout of `models/`: target/ and drafter-NAME/ (every one present)."""
        models_dir = Path(models_dir)
        drafters = {p.name.removeprefix("drafter-"): p for p in sorted(models_dir.glob("drafter-*"))
                    if (p / "config.json").exists()}
        head = models_dir / "head"
        return cls(models_dir / "target", drafters, head=head if (head / "head.json").exists() else None)

    @classmethod
    def of(cls, models: Path | str | ModelSet) -> ModelSet:
        return models if isinstance(models, ModelSet) else cls.bundled(Path(models))

    def with_overrides(self, target: Path | None = None, drafters: list[str] | tuple[str, ...] = (),
                       dtype: str | None = None, head: Path | None = None, device: str | None = None) -> ModelSet:
        """This set with the target replaced and `NAME=PATH` drafters added or replaced. Raises ValueError on a
        malformed entry, an invalid name or a folder without config.json, and on a --device torch cannot use (auto is
        resolved here, so that the processes `up` starts are given one device)."""
        out = dict(self.drafters)
        for entry in drafters:
            name, sep, path = entry.partition("=")
            name = name.strip().removeprefix("drafter-")
            if not sep or not path.strip():
                raise ValueError(f"--drafter takes NAME=PATH (a name and a Hugging Face folder), got {entry!r}")
            if not NAME.match(name) or name in MODEL_FREE or name == "head":
                raise ValueError(f"drafter name {name!r} must be lower-case letters, digits and '-' (at most 40, a "
                                 f"DNS label) and not one of the model-free pools {', '.join(MODEL_FREE)} or head "
                                 "(a draft head is given with --head)")
            out[name] = _folder(Path(path.strip()), f"drafter {name}")
        # a new target makes the bundled head meaningless (a head reads one target's features): it goes unless given
        kept = self.head if not target else None
        return ModelSet(_folder(Path(target), "target") if target else self.target, out, dtype or self.dtype,
                        _folder(Path(head), "draft head", "head.json") if head else kept,
                        resolve_device(device) if device else self.device)

    def drafter(self, name: str) -> Path:
        name = name.removeprefix("drafter-")
        if name not in self.drafters:
            raise ValueError(f"unknown drafter {name!r}; this fleet has {', '.join(self.drafters) or 'none'} "
                             "(add one with --drafter NAME=PATH)")
        return self.drafters[name]

    def args(self) -> list[str]:
        """Command-line arguments that give a child process this very set (`--target`, `--drafter` repeated,
        `--dtype`, `--device`)."""
        out = ["--target", str(self.target), "--dtype", self.dtype, "--device", self.device]
        for name, path in self.drafters.items():
            out += ["--drafter", f"{name}={path}"]
        if self.head is not None:
            out += ["--head", str(self.head)]
        return out


def _folder(path: Path, what: str, marker: str = "config.json") -> Path:
    if not (path / marker).exists():
        kind = "a Hugging Face folder" if marker == "config.json" else "a folder"
        raise ValueError(f"no model for the {what} at {path} (expected {kind} with {marker})")
    return path


def _vocab_size(path: Path) -> int:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path / 'config.json'}: {exc}") from exc
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not isinstance(size, int):
        raise ValueError(f"{path}/config.json has no vocab_size")
    return size


def check_compatible(target: Path, drafter: Path, name: str) -> None:
    """Raises ValueError unless the drafter at `drafter` proposes token ids of the target's vocabulary: equal
    vocabulary sizes, and equal tokenizers where both folders carry one (the first differing token named)."""
    want, got = _vocab_size(target), _vocab_size(drafter)
    if want != got:
        raise ValueError(f"drafter {name} ({drafter}) has vocab_size={got} but the target ({target}) has "
                         f"vocab_size={want}: a drafter must share the target's vocabulary")
    if not ((target / "tokenizer.json").exists() and (drafter / "tokenizer.json").exists()):
        return
    if (target / "tokenizer.json").read_bytes() == (drafter / "tokenizer.json").read_bytes():
        return
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(str(target)).get_vocab()
    b = AutoTokenizer.from_pretrained(str(drafter)).get_vocab()
    if a == b:
        return
    ids_a, ids_b = {i: t for t, i in a.items()}, {i: t for t, i in b.items()}
    first = min(i for i in set(ids_a) | set(ids_b) if ids_a.get(i) != ids_b.get(i))
    raise ValueError(f"drafter {name} ({drafter}) has another tokenizer than the target ({target}): token id "
                     f"{first} is {ids_b.get(first)!r} for the drafter and {ids_a.get(first)!r} for the target")


def check_all(models: ModelSet, names: list[str] | tuple[str, ...] | None = None) -> None:
    """check_compatible for the named drafters (default: all of them)."""
    for name in names if names is not None else list(models.drafters):
        if name not in MODEL_FREE and name != "head":  # the head is checked against its target when it loads
            check_compatible(models.target, models.drafter(name), name)
