"""Read and write Hugging Face model directories (config.json + model.safetensors).

`from_pretrained(path)` builds our model from a HF directory of a supported family;
`save_pretrained(model, dir)` writes one that `transformers` loads as the equivalent HF model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


# HF architecture names of models that `generate` (their folders get a generation_config.json)
_GENERATIVE = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def generation_settings(hf_cfg: dict, tokenizer: Any = None, sampling: dict | None = None) -> dict | None:
    """The generation_config.json of a model with HF config `hf_cfg`: its special token ids
    (the tokenizer's where it has them) and `sampling` (do_sample, temperature, top_k, ...);
    None for a model that does not generate."""
    if not any(a.endswith(_GENERATIVE) for a in hf_cfg.get("architectures") or []):
        return None
    out: dict[str, Any] = {}
    for name in ("bos", "eos", "pad", "decoder_start"):
        value = getattr(tokenizer, f"{name}_id", None)
        value = value if value is not None else hf_cfg.get(f"{name}_token_id")
        if value is not None:
            out[f"{name}_token_id"] = int(value)
    return {**out, **(sampling or {})}


def save_pretrained(model: nn.Module, path: str | Path, tokenizer: Any = None, *, sampling: dict | None = None) -> Path:
    """Write `model` as a HF directory (config.json + model.safetensors), with `tokenizer`'s
    files when given (a run's char, byte or BPE tokenizer as a tokenizer.json that transformers'
    AutoTokenizer loads and that encodes the same ids; a pretrained tokenizer as it came);
    returns the directory. A model that generates also gets a generation_config.json (see
    generation_settings; `sampling` adds the default sampling settings).

    Everything is checked and converted before anything is written; the files are written into
    a temporary sibling folder and moved into place at the end, so a failure leaves `path` as it
    was. Tied tensors are stored once, under the name HF keeps; `transformers` re-ties the rest.
    """
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from ..tokenizers import hf_tokenizer_files

    if not hasattr(model, "config"):
        raise ValueError(f"save_pretrained needs an anyformer model with a .config, got {type(model).__name__}")
    hf_cfg, hf_sd = model_to_hf(model)
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; give a directory to write the model into")
    # a run's tokenizer converts (or says it cannot, before anything is written); a pretrained one saves itself
    convert = tokenizer is not None and (hasattr(tokenizer, "to_hf") or not hasattr(tokenizer, "save"))
    text_files = hf_tokenizer_files(tokenizer) if convert else None
    seen: dict[int, str] = {}
    unique: dict[str, Tensor] = {}
    for name, t in hf_sd.items():
        key = t.data_ptr()
        if key in seen:
            continue  # a tied alias of a tensor already written
        seen[key] = name
        unique[name] = t.detach().to("cpu").contiguous()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    mask = os.umask(0)
    os.umask(mask)
    staging.chmod(0o777 & ~mask)  # the folder's permissions of a plain mkdir, not mkdtemp's 0700
    try:
        save_file(unique, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        generation = generation_settings(hf_cfg, tokenizer, sampling)
        if generation is not None:
            (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if text_files is not None:
            for name, body in text_files.items():
                (staging / name).write_text(body)
        elif tokenizer is not None:
            tokenizer.save(staging)  # a pretrained tokenizer writes its own files
        if not root.exists():
            staging.rename(root)
        else:
            for f in staging.iterdir():
                os.replace(f, root / f.name)
            staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


__all__ = ["from_pretrained", "load_weights", "save_pretrained"]

EXPORTERS.register("hf")(save_pretrained)  # model.save_pretrained(dir) on every model class
