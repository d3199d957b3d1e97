"""Read GGUF checkpoints (llama.cpp's single-file format) into Hugging Face-style configs and weights.

A GGUF file holds metadata (architecture hyperparameters, tokenizer, chat template) and tensors,
often block-quantized (Q4_1, Q8_0, ...). `load_gguf` dequantizes every tensor with the `gguf`
package and renames it to the Hugging Face layout of the same architecture, so the rest of
anyformer (anyformer.convert.hf) only ever sees one checkpoint layout.

llama.cpp stores Llama's q/k projection rows permuted for its interleaved RoPE (pairs (2i, 2i+1)
per head); `unpermute_rope_rows` restores Hugging Face's half-split order (i, i + d/2).

Legend: `h` heads, `d` head dim, `r` rows (h * d), `c` columns.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError
from ..registry import Registry

GGUF_MAGIC = b"GGUF"
# Metadata arrays longer than this are kept as their length unless asked for by name.
_SMALL_ARRAY = 64


@dataclass
class GGUFArchitecture:
    """How one GGUF architecture maps to Hugging Face.

    hf_config(metadata, tensor_names) -> the HF config dict; tensor_name(gguf_name) -> the HF
    tensor name; transform(gguf_name, array, hf_config) -> the array in HF layout.
    """

    hf_config: Callable[[dict[str, Any], set[str]], dict[str, Any]]
    tensor_name: Callable[[str], str]
    transform: Callable[[str, np.ndarray, dict[str, Any]], np.ndarray] = lambda name, w, cfg: w


GGUF_ARCHITECTURES: Registry[GGUFArchitecture] = Registry("GGUF architecture")


@dataclass
class GGUFCheckpoint:
    """A loaded GGUF file: Hugging Face config dict, HF-named state dict and the raw metadata."""

    path: Path
    architecture: str
    config: dict[str, Any]
    state_dict: dict[str, Tensor]
    metadata: dict[str, Any] = field(repr=False)


# --------------------------------------------------------------------------- file access


def check_gguf_file(path: str | Path) -> Path:
    """Return `path` as a Path if it is an existing GGUF file; raise a clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist; give the path to a .gguf file")
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file; give the path to a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, a GGUF file starts with {GGUF_MAGIC!r}); "
            "give a llama.cpp .gguf checkpoint, or a Hugging Face model directory"
        )
    return path


def is_gguf_file(path: str | Path) -> bool:
    """True when `path` is a file that starts with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _reader(path: str | Path) -> Any:
    """A gguf.GGUFReader over `path` (memory-mapped), with clear errors."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading .gguf files needs the `gguf` package: pip install gguf") from e
    path = check_gguf_file(path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:
        raise ValueError(f"cannot read GGUF file {str(path)!r}: {e}; the file may be truncated or corrupt") from e


def _field_value(f: Any, full: bool) -> Any:
    """One metadata field as a Python value (a short array as a list; a long one only when `full`)."""
    import gguf

    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY and len(f.data) > _SMALL_ARRAY and not full:
        return len(f.data)
    return f.contents()


def read_metadata(reader: Any, full_arrays: tuple[str, ...] = ()) -> dict[str, Any]:
    """All metadata of a GGUFReader as a dict; arrays not named in `full_arrays` and longer than
    64 items are replaced by their length (tokenizer vocabularies are large)."""
    return {
        name: _field_value(f, name in full_arrays)
        for name, f in reader.fields.items()
        if not name.startswith("GGUF.")
    }


def gguf_metadata(path: str | Path, full_arrays: tuple[str, ...] = ()) -> dict[str, Any]:
    """The metadata of the GGUF file at `path` (see `read_metadata`)."""
    return read_metadata(_reader(path), full_arrays)


def find_packaged_gguf(package: str) -> Path:
    """The single .gguf file inside an installed package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; pip install it to get its .gguf file")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"package {package!r} holds no .gguf file")


# --------------------------------------------------------------------------- llama


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (2i, 2i+1) -> (i, i + d/2).

    w: (r, c) with r = num_heads * d (or (r,) for a bias). llama.cpp's converter maps HF row
    order (h, 2, d/2) to (h, d/2, 2); this is the inverse.
    """
    rows = w.shape[0]
    if rows % (2 * num_heads):
        raise ConfigError(f"cannot un-permute {rows} rows over {num_heads} heads: rows must be a multiple of 2 * heads")
    d2 = rows // num_heads // 2
    return w.reshape(num_heads, d2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # (h, d/2, 2, c) -> (h, 2, d/2, c)


def _llama_config(meta: dict[str, Any], tensors: set[str]) -> dict[str, Any]:
    """Hugging Face LlamaConfig dict from llama.cpp metadata."""
    a = meta["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{a}.{key}", default)
        if value is None:
            raise ConfigError(f"GGUF metadata lacks {a}.{key}, which a {a} model needs")
        return value

    dim, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(meta.get(f"{a}.attention.key_length", meta.get(f"{a}.rope.dimension_count", dim // heads)))
    vocab = meta.get(f"{a}.vocab_size", meta.get("tokenizer.ggml.tokens"))
    if vocab is None:
        raise ConfigError("GGUF metadata gives neither llama.vocab_size nor tokenizer.ggml.tokens")
    if f"{a}.rope.scaling.type" in meta and meta[f"{a}.rope.scaling.type"] not in ("none", "linear"):
        raise ConfigError(f"GGUF rope scaling {meta[f'{a}.rope.scaling.type']!r} is not supported; supported: none, linear")
    cfg: dict[str, Any] = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=int(vocab if isinstance(vocab, int) else len(vocab)),
        hidden_size=dim,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        hidden_act="silu",
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias=False,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    if meta.get(f"{a}.rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    return cfg


_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _llama_tensor_name(name: str) -> str:
    """llama.cpp tensor name -> Hugging Face Llama name (e.g. blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight)."""
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LLAMA_BLOCK:
        return f"model.layers.{parts[1]}.{_LLAMA_BLOCK[parts[2]]}.{suffix}"
    if stem in _LLAMA_TOP:
        return f"{_LLAMA_TOP[stem]}.{suffix}"
    raise ConfigError(f"GGUF tensor {name!r} has no place in a Llama model; known: {', '.join([*_LLAMA_TOP, *_LLAMA_BLOCK])}")


def _llama_transform(name: str, w: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    if ".attn_q." in name:
        return unpermute_rope_rows(w, cfg["num_attention_heads"])
    if ".attn_k." in name:
        return unpermute_rope_rows(w, cfg["num_key_value_heads"])
    return w


GGUF_ARCHITECTURES.register("llama")(GGUFArchitecture(_llama_config, _llama_tensor_name, _llama_transform))


# --------------------------------------------------------------------------- loading


def gguf_hf_config(path: str | Path) -> dict[str, Any]:
    """The Hugging Face config dict of a GGUF file, from its metadata and tensor names alone
    (nothing is dequantized): what `anyformer info` needs."""
    reader = _reader(path)
    meta = read_metadata(reader)
    arch_name = meta.get("general.architecture")
    if arch_name is None or arch_name not in GGUF_ARCHITECTURES:
        raise ConfigError(f"GGUF file {str(path)!r} has architecture {arch_name!r}; supported: {', '.join(GGUF_ARCHITECTURES.names())}")
    return GGUF_ARCHITECTURES.get(arch_name).hf_config(meta, {t.name for t in reader.tensors})


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32, progress: bool = False) -> GGUFCheckpoint:
    """Read a GGUF file, dequantize every tensor to `dtype` and rename it to the Hugging Face layout.

    Returns a GGUFCheckpoint whose `config` is the Hugging Face config dict and `state_dict` the
    HF-named tensors (tied output embeddings are not repeated). Raises ValueError for a file that is
    not GGUF and ConfigError for an architecture or tensor anyformer cannot place.
    """
    import gguf

    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    reader = _reader(path)
    meta = read_metadata(reader, full_arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"))
    arch_name = meta.get("general.architecture")
    if arch_name is None:
        raise ConfigError(f"GGUF file {str(path)!r} states no general.architecture")
    try:
        arch = GGUF_ARCHITECTURES.get(arch_name)
    except KeyError:
        raise ConfigError(
            f"GGUF architecture {arch_name!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES.names())}"
        ) from None
    names = {t.name for t in reader.tensors}
    cfg = arch.hf_config(meta, names)
    tensors = reader.tensors
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, desc="dequantizing", unit="tensor")
    sd: dict[str, Tensor] = {}
    for t in tensors:
        w = gguf.quants.dequantize(np.asarray(t.data).view(np.ndarray), t.tensor_type)  # (r, c); a plain array dequantizes faster than a memmap
        w = arch.transform(t.name, w, cfg)
        sd[arch.tensor_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)
    return GGUFCheckpoint(Path(path), arch_name, cfg, sd, meta)
