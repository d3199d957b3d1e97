"""Hugging Face state dicts <-> anyformer state dicts for GPT-2, BERT, T5 and Llama.

Each family is a list of `Entry` rules: which of our tensors come from which HF tensors and
how (renamed, transposed from GPT-2's Conv1D, split from a fused q/k/v projection). Tied
weights appear under several names on both sides; each alias must equal its canonical
tensor. Any HF tensor no rule accounts for raises an error naming it.

Legend: `d` model width, `f` feed-forward width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..config import ModelConfig
from .hf_config import FAMILIES, HF_READERS, config_from_hf, config_to_hf, family_of

Fn = Callable[[list[Tensor]], list[Tensor]]


class ConversionError(ValueError):
    """A state dict that does not fit the conversion rules: missing, unknown or misshapen tensors."""


def _same(xs: list[Tensor]) -> list[Tensor]:
    return list(xs)


def _transpose(xs: list[Tensor]) -> list[Tensor]:
    return [x.t().contiguous() for x in xs]


def _split3_conv(xs: list[Tensor]) -> list[Tensor]:
    """GPT-2 c_attn: weight (d, 3d) as Conv1D or bias (3d,) -> q, k, v in nn.Linear layout."""
    (x,) = xs
    x = x.t() if x.dim() == 2 else x  # (3d, d) or (3d,)
    return [c.contiguous() for c in x.chunk(3, dim=0)]


def _merge3_conv(xs: list[Tensor]) -> list[Tensor]:
    """q, k, v (d, d) or (d,) -> GPT-2 c_attn weight (d, 3d) or bias (3d,)."""
    cat = torch.cat(xs, dim=0)  # (3d, d) or (3d,)
    return [cat.t().contiguous() if cat.dim() == 2 else cat]


@dataclass
class Entry:
    """Our tensors `ours` are made from HF tensors `hf` by `to_ours`, and back by `to_hf`."""

    ours: tuple[str, ...]
    hf: tuple[str, ...]
    to_ours: Fn = _same
    to_hf: Fn = _same


@dataclass
class Rules:
    """A family's entries, tied-weight aliases (alias -> canonical) on each side, and
    derived HF buffers (regexes) that are dropped on reading."""

    entries: list[Entry]
    hf_aliases: dict[str, str]
    our_aliases: dict[str, str]
    hf_ignored: tuple[str, ...] = ()


def _one(ours: str, hf: str, fn: tuple[Fn, Fn] = (_same, _same)) -> Entry:
    return Entry((ours,), (hf,), fn[0], fn[1])


def _linear(entries: list[Entry], ours: str, hf: str, bias: bool) -> None:
    entries.append(_one(f"{ours}.weight", f"{hf}.weight"))
    if bias:
        entries.append(_one(f"{ours}.bias", f"{hf}.bias"))


def _gpt2(cfg: ModelConfig) -> Rules:
    e = [_one("embed.tokens.weight", "transformer.wte.weight"), _one("positional.table.weight", "transformer.wpe.weight")]
    conv = (_transpose, _transpose)
    for i in range(cfg.num_layers):
        o, h = f"stack.blocks.{i}", f"transformer.h.{i}"
        for kind in ("weight", "bias"):
            e.append(Entry(tuple(f"{o}.attn.sublayer.{p}_proj.{kind}" for p in "qkv"), (f"{h}.attn.c_attn.{kind}",), _split3_conv, _merge3_conv))
        e += [
            _one(f"{o}.attn.sublayer.o_proj.weight", f"{h}.attn.c_proj.weight", conv),
            _one(f"{o}.attn.sublayer.o_proj.bias", f"{h}.attn.c_proj.bias"),
            _one(f"{o}.ffn.sublayer.up.weight", f"{h}.mlp.c_fc.weight", conv),
            _one(f"{o}.ffn.sublayer.up.bias", f"{h}.mlp.c_fc.bias"),
            _one(f"{o}.ffn.sublayer.down.weight", f"{h}.mlp.c_proj.weight", conv),
            _one(f"{o}.ffn.sublayer.down.bias", f"{h}.mlp.c_proj.bias"),
        ]
        _linear(e, f"{o}.attn.norm", f"{h}.ln_1", True)
        _linear(e, f"{o}.ffn.norm", f"{h}.ln_2", True)
    _linear(e, "stack.final_norm", "transformer.ln_f", True)
    if cfg.tie_embeddings:
        return Rules(e, {"lm_head.weight": "transformer.wte.weight"}, {"lm_head.proj.weight": "embed.tokens.weight"},
                     (r"transformer\.h\.\d+\.attn\.(masked_)?bias",))
    e.append(_one("lm_head.proj.weight", "lm_head.weight"))
    return Rules(e, {}, {}, (r"transformer\.h\.\d+\.attn\.(masked_)?bias",))


def _bert(cfg: ModelConfig) -> Rules:
    e = [
        _one("embed.tokens.weight", "embeddings.word_embeddings.weight"),
        _one("positional.table.weight", "embeddings.position_embeddings.weight"),
        _one("embed.token_types.weight", "embeddings.token_type_embeddings.weight"),
    ]
    _linear(e, "embed.norm", "embeddings.LayerNorm", True)
    for i in range(cfg.num_layers):
        o, h = f"stack.blocks.{i}", f"encoder.layer.{i}"
        for ours, theirs in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            _linear(e, f"{o}.attn.sublayer.{ours}", f"{h}.attention.self.{theirs}", True)
        _linear(e, f"{o}.attn.sublayer.o_proj", f"{h}.attention.output.dense", True)
        _linear(e, f"{o}.attn.norm", f"{h}.attention.output.LayerNorm", True)
        _linear(e, f"{o}.ffn.sublayer.up", f"{h}.intermediate.dense", True)
        _linear(e, f"{o}.ffn.sublayer.down", f"{h}.output.dense", True)
        _linear(e, f"{o}.ffn.norm", f"{h}.output.LayerNorm", True)
    if cfg.head.kind == "embedding" and cfg.head.pooler:
        _linear(e, "head.pooler.dense.0", "pooler.dense", True)
    return Rules(e, {}, {}, (r"embeddings\.position_ids",))


def _t5_attn(e: list[Entry], ours: str, hf: str) -> None:
    for p in "qkvo":
        e.append(_one(f"{ours}.{p}_proj.weight", f"{hf}.{p}.weight"))


def _t5_ffn(e: list[Entry], cfg: ModelConfig, ours: str, hf: str) -> None:
    if cfg.ffn.kind == "geglu":
        e += [_one(f"{ours}.gate.weight", f"{hf}.wi_0.weight"), _one(f"{ours}.up.weight", f"{hf}.wi_1.weight")]
    else:
        e.append(_one(f"{ours}.up.weight", f"{hf}.wi.weight"))
    e.append(_one(f"{ours}.down.weight", f"{hf}.wo.weight"))


def _t5(cfg: ModelConfig) -> Rules:
    e = [
        _one("src_embed.tokens.weight", "shared.weight"),
        _one("enc_positional.table.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        _one("dec_positional.table.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    ]
    for i in range(cfg.num_layers):
        o, h = f"encoder.blocks.{i}", f"encoder.block.{i}.layer"
        _t5_attn(e, f"{o}.attn.sublayer", f"{h}.0.SelfAttention")
        e.append(_one(f"{o}.attn.norm.weight", f"{h}.0.layer_norm.weight"))
        _t5_ffn(e, cfg, f"{o}.ffn.sublayer", f"{h}.1.DenseReluDense")
        e.append(_one(f"{o}.ffn.norm.weight", f"{h}.1.layer_norm.weight"))
    for i in range(cfg.num_decoder_layers or cfg.num_layers):
        o, h = f"decoder.blocks.{i}", f"decoder.block.{i}.layer"
        _t5_attn(e, f"{o}.attn.sublayer", f"{h}.0.SelfAttention")
        e.append(_one(f"{o}.attn.norm.weight", f"{h}.0.layer_norm.weight"))
        _t5_attn(e, f"{o}.cross_attn.sublayer", f"{h}.1.EncDecAttention")
        e.append(_one(f"{o}.cross_attn.norm.weight", f"{h}.1.layer_norm.weight"))
        _t5_ffn(e, cfg, f"{o}.ffn.sublayer", f"{h}.2.DenseReluDense")
        e.append(_one(f"{o}.ffn.norm.weight", f"{h}.2.layer_norm.weight"))
    e += [_one("encoder.final_norm.weight", "encoder.final_layer_norm.weight"), _one("decoder.final_norm.weight", "decoder.final_layer_norm.weight")]
    hf_alias = {k: "shared.weight" for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
    ours_alias = {"tgt_embed.tokens.weight": "src_embed.tokens.weight"}
    if cfg.tie_embeddings:
        hf_alias["lm_head.weight"] = "shared.weight"
        ours_alias["lm_head.proj.weight"] = "src_embed.tokens.weight"
    else:
        e.append(_one("lm_head.proj.weight", "lm_head.weight"))
    return Rules(e, hf_alias, ours_alias, (r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",))


def _llama(cfg: ModelConfig) -> Rules:
    e = [_one("embed.tokens.weight", "model.embed_tokens.weight")]
    for i in range(cfg.num_layers):
        o, h = f"stack.blocks.{i}", f"model.layers.{i}"
        for p in "qkv":
            _linear(e, f"{o}.attn.sublayer.{p}_proj", f"{h}.self_attn.{p}_proj", cfg.attention.bias)
        out_bias = cfg.attention.bias if cfg.attention.out_bias is None else cfg.attention.out_bias
        _linear(e, f"{o}.attn.sublayer.o_proj", f"{h}.self_attn.o_proj", out_bias)
        for p in ("gate", "up", "down"):
            _linear(e, f"{o}.ffn.sublayer.{p}", f"{h}.mlp.{p}_proj", cfg.ffn.bias)
        e.append(_one(f"{o}.attn.norm.weight", f"{h}.input_layernorm.weight"))
        e.append(_one(f"{o}.ffn.norm.weight", f"{h}.post_attention_layernorm.weight"))
    e.append(_one("stack.final_norm.weight", "model.norm.weight"))
    ignored = (r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",)
    if cfg.tie_embeddings:
        return Rules(e, {"lm_head.weight": "model.embed_tokens.weight"}, {"lm_head.proj.weight": "embed.tokens.weight"}, ignored)
    e.append(_one("lm_head.proj.weight", "lm_head.weight"))
    return Rules(e, {}, {}, ignored)


_RULES: dict[str, Callable[[ModelConfig], Rules]] = {"gpt2": _gpt2, "bert": _bert, "t5": _t5, "llama": _llama}


def rules(family: str, cfg: ModelConfig) -> Rules:
    """The conversion rules of `family` for the sizes in `cfg`."""
    if family not in _RULES:
        hint = f" ({family} state dicts are read by its registered HFReader, model_from_hf)" if family in HF_READERS else ""
        raise ConversionError(f"unsupported family {family!r}; supported: {', '.join(FAMILIES)}{hint}")
    return _RULES[family](cfg)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor in the state dict of the model `cfg` builds (no memory used)."""
    from ..models import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_aliases(sd: dict[str, Tensor], aliases: dict[str, str], side: str) -> None:
    for alias, canon in aliases.items():
        if alias in sd and canon in sd and not torch.equal(sd[alias], sd[canon]):
            raise ConversionError(
                f"{side} tensor {alias!r} should be tied to {canon!r} (the config ties them) but holds different values"
            )


def _names(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def state_dict_from_hf(family: str, hf_sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict (for `build_model(cfg)`) from a HF state dict of `family`.

    Raises ConversionError naming missing tensors, tensors no rule accounts for, and shape mismatches.
    """
    r = rules(family, cfg)
    _check_aliases(hf_sd, r.hf_aliases, "HF")
    hf = {k: v for k, v in hf_sd.items() if k not in r.hf_aliases}
    for alias, canon in r.hf_aliases.items():  # a checkpoint may hold only the alias of a tied tensor
        if canon not in hf and alias in hf_sd:
            hf[canon] = hf_sd[alias]
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    missing = [k for e in r.entries for k in e.hf if k not in hf]
    if missing:
        raise ConversionError(f"the HF {family} state dict lacks tensors the config needs: {_names(missing)}")
    for e in r.entries:
        made = e.to_ours([hf[k] for k in e.hf])
        out.update(zip(e.ours, made))
        used.update(e.hf)
    extra = [k for k in hf if k not in used and not any(re.fullmatch(p, k) for p in r.hf_ignored)]
    if extra:
        raise ConversionError(
            f"the HF {family} state dict has tensors with no place in this model: {_names(extra)}; "
            "check the architecture (only the base model and LM head are converted)"
        )
    for alias, canon in r.our_aliases.items():
        out[alias] = out[canon]
    shapes = expected_shapes(cfg)
    bad = [f"{k} {tuple(v.shape)} (expected {shapes[k]})" for k, v in out.items() if tuple(v.shape) != shapes.get(k)]
    if bad:
        raise ConversionError(f"converted HF {family} tensors do not fit the config: {_names(bad)}")
    return out


def state_dict_to_hf(family: str, our_sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A HF state dict of `family` (tied tensors under every name HF uses) from ours."""
    r = rules(family, cfg)
    _check_aliases(our_sd, r.our_aliases, "anyformer")
    missing = [k for e in r.entries for k in e.ours if k not in our_sd]
    if missing:
        raise ConversionError(f"the anyformer state dict lacks tensors the {family} layout needs: {_names(missing)}")
    used = {k for e in r.entries for k in e.ours} | set(r.our_aliases)
    extra = [k for k in our_sd if k not in used]
    if extra:
        raise ConversionError(f"these anyformer tensors have no place in the HF {family} layout: {_names(extra)}")
    out: dict[str, Tensor] = {}
    for e in r.entries:
        out.update(zip(e.hf, e.to_hf([our_sd[k] for k in e.ours])))
    for alias, canon in r.hf_aliases.items():
        out[alias] = out[canon]
    return out


def model_from_hf(hf_config: dict, hf_sd: dict[str, Tensor]) -> torch.nn.Module:
    """Our model with the weights of a HF model given its config dict and state dict."""
    from ..models import build_model

    cfg = config_from_hf(hf_config)
    if hf_config.get("model_type") == "bert" and "pooler.dense.weight" not in hf_sd:
        cfg.head.kind, cfg.head.pooler = "none", False
    family = hf_config["model_type"]
    if family in HF_READERS:
        sd = HF_READERS.get(family).state_dict(dict(hf_sd), cfg)
    else:
        sd = state_dict_from_hf(family, hf_sd, cfg)
    model = build_model(cfg)
    model.load_state_dict(sd, strict=True)
    if hf_config.get("is_encoder_decoder"):  # T5 starts decoding from its pad id, others their own
        start = hf_config.get("decoder_start_token_id")
        model.decoder_start_token_id = start if start is not None else hf_config.get("pad_token_id")
    return model.eval()


def model_to_hf(model: torch.nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """(HF config dict, HF state dict) of one of our models."""
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    family = family_of(cfg)
    return config_to_hf(cfg, family), state_dict_to_hf(family, model.state_dict(), cfg)


__all__ = [
    "ConversionError",
    "Entry",
    "Rules",
    "config_from_hf",
    "config_to_hf",
    "expected_shapes",
    "model_from_hf",
    "model_to_hf",
    "rules",
    "state_dict_from_hf",
    "state_dict_to_hf",
]
