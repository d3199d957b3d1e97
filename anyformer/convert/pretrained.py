"""Read and write Hugging Face model directories (config.json + model.safetensors).

`from_pretrained(path)` builds our model from a HF directory of a supported family;
`save_pretrained(model, dir)` writes one that `transformers` loads as the equivalent HF model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.common import EXPORTERS
from .hf import ConversionError, model_from_hf, model_to_hf
from .hf_config import family_of_hf, supported_architectures

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _read_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no config.json; a Hugging Face model directory holds config.json and model.safetensors")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it should be a Hugging Face config.json") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _check_architecture(cfg: dict, path: Path) -> None:
    archs = cfg.get("architectures") or []
    known = supported_architectures()
    supported = ", ".join(known)
    family_of_hf(cfg)  # unknown model_type raises, naming the supported ones
    for a in archs:
        if a not in known:
            raise ValueError(f"{path}: unsupported architecture {a!r}; supported architectures: {supported}")


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a .safetensors file or a torch pickle (loaded with weights_only=True)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weight file {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{p} is not a readable safetensors file: {e}") from None
    if p.suffix in (".bin", ".pt", ".pth"):
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several unrelated types for a bad pickle
            raise ValueError(f"{p} is not a readable PyTorch weight file (loaded with weights_only=True): {e}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise ValueError(f"{p} does not hold a state dict (a mapping of names to tensors)")
        return sd
    raise ValueError(f"{p}: unsupported weight file type {p.suffix!r}; expected .safetensors or .bin")


def from_pretrained(path: str | Path) -> nn.Module:
    """Our model (in eval mode) from a HF model directory of a GPT-2, BERT, T5 or Llama model, or
    of a model type a converter file registers a reader for (ViT, AST: anyformer.convert.HF_READERS).

    Weights are loaded into fp32 parameters. A BERT checkpoint with a pooler gives a model
    whose forward returns BertModel's `pooler_output` (its `hidden()` is `last_hidden_state`);
    without one, forward returns the hidden states.

    Args:
        path: a directory with config.json and model.safetensors (or pytorch_model.bin).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"model directory {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is a file; from_pretrained expects a Hugging Face model directory (config.json + model.safetensors)")
    cfg = _read_config(root)
    _check_architecture(cfg, root)
    for name in WEIGHT_FILES:
        if (root / name).is_file():
            sd = load_weights(root / name)
            break
    else:
        sharded = sorted(p.name for p in root.glob("*.index.json"))
        hint = f" (sharded checkpoints such as {sharded[0]} are not supported)" if sharded else ""
        raise FileNotFoundError(f"{root} has no weight file: expected one of {', '.join(WEIGHT_FILES)}{hint}")
    try:
        return model_from_hf(cfg, sd)
    except ConversionError as e:
        raise ConversionError(f"{root}: {e}") from None


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """Write `model` as a HF directory (config.json + model.safetensors); returns the directory.

    Tied tensors are stored once, under the name HF keeps; `transformers` re-ties the rest.
    """
    from safetensors.torch import save_file

    if not hasattr(model, "config"):
        raise ValueError(f"save_pretrained needs an anyformer model with a .config, got {type(model).__name__}")
    hf_cfg, hf_sd = model_to_hf(model)
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; give a directory to write the model into")
    root.mkdir(parents=True, exist_ok=True)
    seen: dict[int, str] = {}
    unique: dict[str, Tensor] = {}
    for name, t in hf_sd.items():
        key = t.data_ptr()
        if key in seen:
            continue  # a tied alias of a tensor already written
        seen[key] = name
        unique[name] = t.detach().to("cpu").contiguous()
    save_file(unique, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return root


__all__ = ["from_pretrained", "load_weights", "save_pretrained"]

EXPORTERS.register("hf")(save_pretrained)  # model.save_pretrained(dir) on every model class
