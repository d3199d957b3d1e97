"""RWKV checkpoints read into anyformer's models and written back: RWKV-7 in the official
layout (the `rwkv` package's and RWKV-LM's `.pth` files), RWKV-4 as transformers'
`RwkvForCausalLM` directories (a registered HF reader, so `from_pretrained(dir)` reads them).

    model = load_rwkv7("RWKV-x070-World-0.1B.pth")       # DecoderLM, eval mode
    save_rwkv7(model, "out.pth")                           # the `rwkv` package loads it
    model = from_pretrained("rwkv-4-169m-pile")           # a transformers RWKV-4 directory
    save_rwkv4_hf(model, "out/")                           # RwkvForCausalLM.from_pretrained loads it

The official names map one to one onto ours (`emb` -> embed.tokens, `blocks.0.ln0` -> the
embedding norm, `blocks.i.ln1/ln2` -> the pre-norms, `blocks.i.att.*` / `blocks.i.ffn.*` ->
the time and channel mixing sublayers under the same names, `ln_out`, `head`); the per-channel
vectors are stored as (1, 1, C) there and (C,) here. The first layer's value-residual LoRA
(`blocks.0.att.v0/v1/v2`) is unused by the model and is dropped on reading.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import AttentionConfig, FeedForwardConfig, ModelConfig, NormConfig, PositionalConfig
from .hf import ConversionError, _names, expected_shapes
from .hf_config import HF_READERS, HFReader

_VECTORS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")
_UNUSED_FIRST = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
RWKV7_MAX_LEN = 1 << 20  # a recurrence has no length limit; this only bounds a decoding call
# official name -> ours, for the tensors outside the blocks; and the parts of a block
_FIXED = {"emb.weight": "embed.tokens.weight", "blocks.0.ln0.weight": "embed.norm.weight", "blocks.0.ln0.bias": "embed.norm.bias",
          "ln_out.weight": "stack.final_norm.weight", "ln_out.bias": "stack.final_norm.bias", "head.weight": "lm_head.proj.weight"}
_PARTS = {"ln1": "attn.norm", "ln2": "ffn.norm", "att": "attn.sublayer", "ffn": "ffn.sublayer"}


def _need(sd: dict[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise ConversionError(f"not an RWKV-7 checkpoint in the official layout: it has no {key!r} "
                              f"(its first tensors: {_names(sorted(sd), 5)})")
    return sd[key]


def rwkv7_config(sd: dict[str, Tensor]) -> ModelConfig:
    """The ModelConfig of an official RWKV-7 state dict, read from its tensor shapes."""
    vocab, dim = _need(sd, "emb.weight").shape
    heads, head_size = _need(sd, "blocks.0.att.r_k").shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    if any(".s_emb" in k or ".s0" in k for k in sd):
        raise ConversionError("this RWKV-7 checkpoint is the DeepEmbed variant (ffn.s_emb, s0, s1, s2), which anyformer does not implement")
    ranks = {"decay_rank": _need(sd, "blocks.0.att.w1").shape[1], "rate_rank": _need(sd, "blocks.0.att.a1").shape[1],
             "gate_rank": _need(sd, "blocks.0.att.g1").shape[1]}
    if layers > 1:
        ranks["value_rank"] = _need(sd, "blocks.1.att.v1").shape[1]
    return ModelConfig(
        vocab_size=vocab, dim=dim, num_layers=layers, max_seq_len=RWKV7_MAX_LEN,
        attention=AttentionConfig(kind="rwkv7", num_heads=heads, head_dim=head_size, options=ranks),
        ffn=FeedForwardConfig(kind="rwkv_channel", hidden_dim=_need(sd, "blocks.0.ffn.key.weight").shape[0]),
        norm=NormConfig(kind="layernorm", eps=1e-5), positional=PositionalConfig(kind="none"),
        embed_norm=True, tie_embeddings=False,
    )


def _our_name(key: str) -> str | None:
    """Our name of an official key (None: not an RWKV-7 tensor)."""
    if key in _FIXED:
        return _FIXED[key]
    m = re.fullmatch(r"blocks\.(\d+)\.(ln1|ln2|att|ffn)\.(.+)", key)
    if m is None:
        return None
    i, part, rest = m.groups()
    return f"stack.blocks.{i}.{_PARTS[part]}.{rest}"


def rwkv7_state_dict_from_official(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict (for `build_model(cfg)`) from an official RWKV-7 one. Raises
    ConversionError naming tensors it cannot place, missing ones and shape mismatches."""
    shapes = expected_shapes(cfg)
    out: dict[str, Tensor] = {}
    unknown = []
    for key, t in sd.items():
        if key in _UNUSED_FIRST:
            continue
        ours = _our_name(key)
        if ours is None or ours not in shapes:
            unknown.append(key)
            continue
        out[ours] = t.reshape(shapes[ours]) if key.rsplit(".", 1)[-1] in _VECTORS and t.numel() == cfg.dim else t
    if unknown:
        raise ConversionError(f"the RWKV-7 checkpoint has tensors with no place in the model: {_names(unknown)}")
    missing = [k for k in shapes if k not in out]
    if missing:
        raise ConversionError(f"the RWKV-7 checkpoint lacks tensors the model needs: {_names(missing)}")
    bad = [f"{k} {tuple(v.shape)} (expected {shapes[k]})" for k, v in out.items() if tuple(v.shape) != shapes[k]]
    if bad:
        raise ConversionError(f"RWKV-7 tensors do not fit the model their shapes describe: {_names(bad)}")
    return out


def rwkv7_state_dict_to_official(our_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official RWKV-7 layout of our state dict (per-channel vectors as (1, 1, C))."""
    fixed = {ours: official for official, ours in _FIXED.items()}
    parts = {ours: official for official, ours in _PARTS.items()}
    inverse: dict[str, Tensor] = {}
    for key, t in our_sd.items():
        m = re.fullmatch(r"stack\.blocks\.(\d+)\.(attn\.norm|ffn\.norm|attn\.sublayer|ffn\.sublayer)\.(.+)", key)
        if key in fixed:
            name = fixed[key]
        elif m is not None:
            i, where, rest = m.groups()
            name = f"blocks.{i}.{parts[where]}.{rest}"
        else:
            raise ConversionError(f"anyformer tensor {key!r} has no place in the official RWKV-7 layout")
        vector = name.rsplit(".", 1)[-1] in _VECTORS and t.dim() == 1
        inverse[name] = (t.reshape(1, 1, -1) if vector else t).detach().to("cpu").contiguous()
    return inverse


def _check_rwkv7_model(model: nn.Module) -> ModelConfig:
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig) or cfg.arch != "decoder" or cfg.attention.kind != "rwkv7" or cfg.ffn.kind != "rwkv_channel":
        raise ConversionError("the official RWKV-7 layout holds decoder models with attention kind 'rwkv7' and ffn kind "
                              "'rwkv_channel'; this model is something else")
    wanted = (cfg.norm.kind, cfg.norm.placement, cfg.positional.kind, cfg.embed_norm, cfg.tie_embeddings, cfg.final_norm)
    if wanted != ("layernorm", "pre", "none", True, False, True):
        raise ConversionError("the official RWKV-7 layout needs model.norm.kind=layernorm (pre), positional kind 'none', "
                              "embed_norm=true, tie_embeddings=false and final_norm=true")
    return cfg


def load_rwkv7(path: str | Path) -> nn.Module:
    """Our RWKV-7 model (eval mode, fp32) from an official `.pth` checkpoint."""
    from ..models import build_model
    from .pretrained import load_weights

    sd = {k: v.float() for k, v in load_weights(path).items()}
    cfg = rwkv7_config(sd)
    try:
        ours = rwkv7_state_dict_from_official(sd, cfg)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
    model = build_model(cfg)
    model.load_state_dict(ours, strict=True)
    return model.eval()


def save_rwkv7(model: nn.Module, path: str | Path) -> Path:
    """Write an RWKV-7 model as an official `.pth` checkpoint that the `rwkv` package loads
    (`RWKV(str(path)[:-4], ...)`). Written to a temporary file and moved into place, so a
    failure leaves `path` as it was."""
    _check_rwkv7_model(model)
    target = Path(path)
    if target.suffix != ".pth":
        raise ValueError(f"an official RWKV-7 checkpoint is a .pth file (the rwkv package appends .pth to the name it is given); got {target}")
    official = rwkv7_state_dict_to_official(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        torch.save(official, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def is_rwkv7_file(path: Path) -> bool:
    """True for a `.pth` file whose tensors are in the official RWKV-7 layout."""
    if path.suffix != ".pth" or not path.is_file():
        return False
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a readable pickle: not ours to claim
        return False
    return isinstance(sd, dict) and "emb.weight" in sd and "blocks.0.att.r_k" in sd


# --------------------------------------------------------------------------- RWKV-4 (transformers' RwkvForCausalLM)

_RWKV4_MIXES = ("time_mix_key", "time_mix_value", "time_mix_receptance")


def rwkv4_config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of a transformers `RwkvConfig` dict (config.json of model_type 'rwkv').

    `rescale_every` halves the hidden states every few layers in transformers' inference mode
    (and its weights to match), a guard against fp16 overflow; anyformer computes without it,
    which equals transformers in fp32 up to LayerNorm's eps acting on the halved states."""
    from ..config import ConfigError

    known = {"vocab_size", "context_length", "hidden_size", "num_hidden_layers", "attention_hidden_size", "intermediate_size",
             "layer_norm_epsilon", "rescale_every", "tie_word_embeddings", "use_cache", "bos_token_id", "eos_token_id",
             "model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "pad_token_id", "initializer_range"}
    unknown = sorted(set(hf) - known)
    if unknown:
        raise ConfigError(f"HF rwkv config has keys the converter does not know: {', '.join(unknown)}; they may change the "
                          "model, so conversion stops rather than guess")
    dim = hf["hidden_size"]
    if hf.get("attention_hidden_size") not in (None, dim):
        raise ConfigError(f"HF rwkv config attention_hidden_size={hf['attention_hidden_size']} differs from hidden_size={dim}; "
                          "anyformer's rwkv4 mixes at the model width")
    if hf.get("tie_word_embeddings"):
        raise ConfigError("HF rwkv config tie_word_embeddings=true is not supported (RWKV-4 has its own head)")
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=dim, num_layers=hf["num_hidden_layers"], max_seq_len=hf.get("context_length", 1024),
        attention=AttentionConfig(kind="rwkv4", num_heads=1),
        ffn=FeedForwardConfig(kind="rwkv4_channel", hidden_dim=hf.get("intermediate_size") or 4 * dim),
        norm=NormConfig(kind="layernorm", eps=float(hf.get("layer_norm_epsilon", 1e-5))), positional=PositionalConfig(kind="none"),
        embed_norm=True, tie_embeddings=False, pad_token_id=hf.get("pad_token_id"),
    )


def _rwkv4_names(cfg: ModelConfig) -> dict[str, str]:
    """Our name -> transformers' name, for every tensor of an RWKV-4 model."""
    names = {"embed.tokens.weight": "rwkv.embeddings.weight", "stack.final_norm.weight": "rwkv.ln_out.weight",
             "stack.final_norm.bias": "rwkv.ln_out.bias", "lm_head.proj.weight": "head.weight",
             "embed.norm.weight": "rwkv.blocks.0.pre_ln.weight", "embed.norm.bias": "rwkv.blocks.0.pre_ln.bias"}
    for i in range(cfg.num_layers):
        o, h = f"stack.blocks.{i}", f"rwkv.blocks.{i}"
        for p in ("weight", "bias"):
            names[f"{o}.attn.norm.{p}"] = f"{h}.ln1.{p}"
            names[f"{o}.ffn.norm.{p}"] = f"{h}.ln2.{p}"
        for p in ("time_decay", "time_first", *_RWKV4_MIXES, "key.weight", "value.weight", "receptance.weight", "output.weight"):
            names[f"{o}.attn.sublayer.{p}"] = f"{h}.attention.{p}"
        for p in ("time_mix_key", "time_mix_receptance", "key.weight", "receptance.weight", "value.weight"):
            names[f"{o}.ffn.sublayer.{p}"] = f"{h}.feed_forward.{p}"
    return names


def rwkv4_state_dict_from_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict from a transformers `RwkvForCausalLM` (or `RwkvModel`) state dict."""
    sd = {(k if k.startswith(("rwkv.", "head.")) else f"rwkv.{k}"): v for k, v in sd.items()}  # RwkvModel has no prefix
    shapes = expected_shapes(cfg)
    names = _rwkv4_names(cfg)
    missing = [hf for hf in names.values() if hf not in sd]
    if missing:
        raise ConversionError(f"the HF rwkv state dict lacks tensors the config needs: {_names(missing)}")
    extra = sorted(set(sd) - set(names.values()))
    if extra:
        raise ConversionError(f"the HF rwkv state dict has tensors with no place in this model: {_names(extra)}")
    out = {ours: sd[hf].reshape(shapes[ours]) if sd[hf].numel() == math.prod(shapes[ours]) else sd[hf] for ours, hf in names.items()}
    bad = [f"{k} {tuple(v.shape)} (expected {shapes[k]})" for k, v in out.items() if tuple(v.shape) != shapes[k]]
    if bad:
        raise ConversionError(f"converted HF rwkv tensors do not fit the config: {_names(bad)}")
    return out


def rwkv4_to_hf(model: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """(config dict, state dict) of transformers' `RwkvForCausalLM` for an RWKV-4 model (ours
    with attention kind 'rwkv4' and ffn kind 'rwkv4_channel'); rescale_every is 0."""
    cfg = getattr(model, "config", None)
    if (not isinstance(cfg, ModelConfig) or cfg.arch != "decoder" or cfg.attention.kind != "rwkv4" or cfg.ffn.kind != "rwkv4_channel"
            or (cfg.norm.kind, cfg.norm.placement, cfg.positional.kind, cfg.embed_norm, cfg.tie_embeddings, cfg.final_norm)
            != ("layernorm", "pre", "none", True, False, True)):
        raise ConversionError("transformers' RwkvForCausalLM holds decoders with attention kind 'rwkv4', ffn kind "
                              "'rwkv4_channel', pre-LayerNorm, positional kind 'none', embed_norm=true and an untied head")
    from ..nn.feedforward import hidden_size

    ours = model.state_dict()
    out = {}
    for name, hf in _rwkv4_names(cfg).items():
        t = ours[name].detach().to("cpu").contiguous()
        out[hf] = t.reshape(1, 1, -1) if hf.rsplit(".", 1)[-1] in _RWKV4_MIXES else t
    hf_cfg = dict(architectures=["RwkvForCausalLM"], model_type="rwkv", vocab_size=cfg.vocab_size, context_length=cfg.max_seq_len,
                  hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers, attention_hidden_size=cfg.dim,
                  intermediate_size=hidden_size(cfg.dim, cfg.ffn.hidden_mult, cfg.ffn.hidden_dim, cfg.ffn.multiple_of),
                  layer_norm_epsilon=cfg.norm.eps, rescale_every=0, tie_word_embeddings=False)
    return hf_cfg, out


def save_rwkv4_hf(model: nn.Module, path: str | Path) -> Path:
    """Write an RWKV-4 model as a transformers `RwkvForCausalLM` directory (config.json +
    model.safetensors), staged in a temporary sibling folder and moved into place."""
    import json
    import shutil

    from safetensors.torch import save_file

    hf_cfg, sd = rwkv4_to_hf(model)
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; give a directory to write the model into")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    try:
        (staging / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        save_file(sd, str(staging / "model.safetensors"))
        root.mkdir(exist_ok=True)
        for f in staging.iterdir():
            os.replace(f, root / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


HF_READERS.register("rwkv")(HFReader(rwkv4_config_from_hf, rwkv4_state_dict_from_hf, ("RwkvForCausalLM", "RwkvModel")))
