"""RASP programs compiled by tracr (Lindner et al. 2023), as anyformer encoders with the same weights.

tracr compiles a RASP program into a norm-free Transformer: token and position embeddings into
a residual stream whose every direction means one value of one variable, then layers of
(attention, ReLU MLP), each adding its output to the stream, and a read-out that projects the
stream onto the output variable's directions (an argmax over them for a categorical output,
the one direction's value for a numerical one). anyformer builds that model from its own parts:
an `encoder` with learned absolute positions, `norm: none`, multi-head attention of tracr's
key size (logits scaled by 1/sqrt(key size), as tracr does), an `mlp` feed-forward with ReLU,
and a `token_classification` head holding the read-out.

A program file is a Python file that defines:
    program       the RASP expression to compile (a `rasp.SOp`)
    vocab         the input values (a set or list)
    max_seq_len   the longest input, without the BOS token the compiler adds
and may define `bos` ("BOS"), `pad` ("PAD") and `mlp_exactness` (100), tracr's settings.

Legend: `n` positions (BOS included), `d` residual width, `h` heads, `k` tracr's key size.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig

INSTALL_HINT = "install the optional extra: pip install 'anyformer[tracr]' (tracr-pypi, jax and dm-haiku)"


class TracrError(ValueError):
    """A program file or a compiled program that cannot become an anyformer model."""


def require_tracr() -> None:
    """Raise TracrError naming the extra to install when tracr cannot be imported."""
    if importlib.util.find_spec("tracr") is None:
        raise TracrError(f"compiling RASP programs needs tracr, which is not installed: {INSTALL_HINT}")


@dataclass
class ProgramFile:
    """What a program file defines: the RASP program and tracr's compiler settings."""

    path: Path
    program: Any
    vocab: list[Any]
    max_seq_len: int
    bos: str = "BOS"
    pad: str = "PAD"
    mlp_exactness: int = 100


def load_program(path: str | Path) -> ProgramFile:
    """Import the program file at `path` and check what it defines (a clear error otherwise)."""
    require_tracr()
    from tracr.rasp import rasp

    p = Path(path)
    if not p.is_file() or p.suffix != ".py":
        raise TracrError(f"program file {str(p)!r} is not a .py file; give a Python file that defines program, vocab and max_seq_len")
    name = f"_anyformer_rasp_{abs(hash(str(p.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, p)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise TracrError(f"running program file {p} failed: {type(e).__name__}: {e}") from e
    finally:
        sys.modules.pop(name, None)
    missing = [n for n in ("program", "vocab", "max_seq_len") if not hasattr(module, n)]
    if missing:
        raise TracrError(f"program file {p} does not define {', '.join(missing)}; it must define program (a RASP SOp), "
                         "vocab (the input values) and max_seq_len (the longest input)")
    if not isinstance(module.program, rasp.SOp):
        raise TracrError(f"program in {p} is a {type(module.program).__name__}, not a RASP sequence operation (rasp.SOp)")
    vocab = sorted(module.vocab, key=repr)
    if not vocab:
        raise TracrError(f"vocab in {p} is empty; list the values an input may hold")
    if not isinstance(module.max_seq_len, int) or module.max_seq_len < 1:
        raise TracrError(f"max_seq_len in {p} must be a positive integer, got {module.max_seq_len!r}")
    words = [str(v) for v in vocab]
    if len(set(words)) != len(words) or any(not w or w.split() != [w] for w in words):
        raise TracrError(f"the values of vocab in {p} must print as distinct single words (no spaces), got {words}")
    settings = {n: getattr(module, n) for n in ("bos", "pad", "mlp_exactness") if hasattr(module, n)}
    return ProgramFile(p, module.program, vocab, module.max_seq_len, **settings)


def compile_program(prog: ProgramFile) -> Any:
    """tracr's compiled model of the program (an AssembledTransformerModel); unsupported RASP
    operations are named."""
    from tracr.compiler import compiling

    if prog.bos in {str(v) for v in prog.vocab} or prog.pad in {str(v) for v in prog.vocab}:
        raise TracrError(f"the compiler's tokens bos={prog.bos!r} and pad={prog.pad!r} must not be values of vocab; "
                         "rename them in the program file (bos = ..., pad = ...)")
    try:
        return compiling.compile_rasp_to_model(prog.program, vocab=set(prog.vocab), max_seq_len=prog.max_seq_len,
                                               compiler_bos=prog.bos, compiler_pad=prog.pad, mlp_exactness=prog.mlp_exactness)
    except NotImplementedError as e:
        what = "; ".join(line for line in str(e).splitlines() if line.strip())
        raise TracrError(f"tracr cannot compile {prog.path}: {what}") from None


@dataclass
class CompiledModel:
    """A compiled program as anyformer weights: the model config, its state dict, the input
    words by token id and the output words by label (None: one numerical output)."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    inputs: list[str]
    outputs: list[str] | None
    bos: str


def _array(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def input_words(prog: ProgramFile) -> list[str]:
    """The input words by token id: BOS, PAD, then the vocab's values as printed (the order of
    task 'program', so a compiled model and a trained one read the same ids)."""
    return [prog.bos, prog.pad, *(str(v) for v in prog.vocab)]


def to_anyformer(assembled: Any, words: list[str]) -> CompiledModel:
    """The anyformer encoder (config and weights) computing what tracr's model computes; token
    id i is `words[i]` (the rows of tracr's token embedding, reordered)."""
    cfg = assembled.model_config
    params = {name: {k: _array(v) for k, v in p.items()} for name, p in assembled.params.items()}
    if cfg.layer_norm:
        raise TracrError("the compiled model uses layer norm, which tracr's read-out assumes absent; it cannot be converted")
    if cfg.causal:
        raise TracrError("the program was compiled causally; convert a non-causal program (anyformer's encoder attends both ways)")
    for name, p in params.items():
        if "b" in p and np.any(p["b"] != 0):
            raise TracrError(f"tracr's {name} has a non-zero bias; the converter maps bias-free projections only")
    tokens = params["token_embed"]["embeddings"]  # (V, d)
    positions = params["pos_embed"]["embeddings"]  # (n, d)
    dim = tokens.shape[1]
    layers = cfg.num_layers
    enc, dec = assembled.input_encoder, assembled.output_encoder
    if not hasattr(enc, "encoding_map"):
        raise TracrError("the program reads numerical tokens; the converter maps categorical inputs (a vocab of values) only")
    rows = {str(value): i for value, i in enc.encoding_map.items()}
    if sorted(rows) != sorted(words):
        raise TracrError(f"the compiled model reads {sorted(rows)}, not the words {sorted(words)}")
    tokens = tokens[[rows[w] for w in words]]
    categorical = dec is not None and hasattr(dec, "encoding_map")
    outputs = None
    if categorical:
        outputs = [""] * len(dec.encoding_map)
        for value, i in dec.encoding_map.items():
            outputs[i] = str(value)
    read_out = _read_out(assembled, dim)  # (d, c)
    if categorical and read_out.shape[1] != len(outputs):
        raise TracrError(f"the read-out has {read_out.shape[1]} directions for {len(outputs)} output values")
    config = ModelConfig(
        arch="encoder", vocab_size=tokens.shape[0], dim=dim, num_layers=layers, max_seq_len=positions.shape[0],
        attention={"num_heads": cfg.num_heads, "head_dim": cfg.key_size, "kernel": "eager"},
        positional={"kind": "learned"}, norm={"kind": "none"},
        ffn={"kind": "mlp", "activation": "relu", "hidden_dim": cfg.mlp_hidden_size},
        head={"kind": "token_classification", "num_labels": read_out.shape[1]},
        tie_embeddings=False, final_norm=False, pad_token_id=1,
    )
    # haiku's Linear holds w as (in, out); torch's as (out, in)
    sd = {"embed.tokens.weight": tokens, "positional.table.weight": positions,
          "head.classifier.weight": read_out.T, "head.classifier.bias": np.zeros(read_out.shape[1])}
    for i in range(layers):
        t, a = f"transformer/layer_{i}", f"stack.blocks.{i}"
        for ours, theirs in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("o_proj", "linear")):
            sd[f"{a}.attn.sublayer.{ours}.weight"] = params[f"{t}/attn/{theirs}"]["w"].T
        sd[f"{a}.ffn.sublayer.up.weight"] = params[f"{t}/mlp/linear_1"]["w"].T
        sd[f"{a}.ffn.sublayer.down.weight"] = params[f"{t}/mlp/linear_2"]["w"].T
    state = {k: torch.tensor(np.ascontiguousarray(v), dtype=torch.float32) for k, v in sd.items()}
    return CompiledModel(config, state, list(words), outputs, str(enc.bos_token))


def _read_out(assembled: Any, dim: int) -> np.ndarray:
    """(d, c): tracr's unembedding matrix, found by reading the model's output for each basis
    direction of the residual stream (the read-out is linear)."""
    import haiku as hk
    import jax.numpy as jnp

    @hk.without_apply_rng
    @hk.transform
    def read(x):  # (d, d) -> (d, c)
        return assembled.get_compiled_model().unembed(x, use_unembed_argmax=False)

    out = np.asarray(read.apply(assembled.params, jnp.eye(dim)), dtype=np.float64)
    return out[:, None] if out.ndim == 1 else out


def tracr_outputs(assembled: Any, words: list[str]) -> tuple[list[Any], np.ndarray]:
    """tracr's own forward on one input: (the decoded outputs after the BOS position, the
    final residual stream (n, d)). `words` are input values as printed (BOS not included)."""
    by_word = {str(v): v for v in assembled.input_encoder.encoding_map}
    out = assembled.apply([assembled.input_encoder.bos_token, *(by_word[w] for w in words)])
    return list(out.decoded[1:]), np.asarray(out.transformer_output[0], dtype=np.float64)
