"""Hugging Face `config.json` <-> ModelConfig for the GPT-2, BERT, T5 and Llama families.

Every key of a HF config is either mapped, known to be irrelevant to the weights and the
forward pass (dropout at inference aside, token ids, bookkeeping), or checked to hold the one
value we can reproduce. Anything else raises ConfigError naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from ..config import ConfigError, ModelConfig, from_dict
from ..registry import Registry

FAMILIES = ("gpt2", "bert", "t5", "llama")  # read and written


@dataclass(frozen=True)
class HFReader:
    """A Hugging Face model type anyformer reads (and does not write), registered by its converter
    file under its `model_type`: its config.json as a ModelConfig, its state dict in our names,
    and the HF architecture names (config.json `architectures`) it covers."""

    config: Callable[[dict[str, Any]], ModelConfig]
    state_dict: Callable[[dict[str, Tensor], ModelConfig], dict[str, Tensor]]
    architectures: tuple[str, ...]


HF_READERS: Registry[HFReader] = Registry("Hugging Face model type")


def read_only() -> tuple[str, ...]:
    """The model types read by a registered HFReader (ViT, AST, ...)."""
    return tuple(HF_READERS.names())


def supported_architectures() -> dict[str, str]:
    """Every HF architecture name we load, with its model type."""
    return {**ARCHITECTURES, **{a: mt for mt in read_only() for a in HF_READERS.get(mt).architectures}}

# Keys of every HF config that do not change the weights or the forward pass.
_GENERIC = {
    "transformers_version", "architectures", "model_type", "output_hidden_states", "output_attentions",
    "return_dict", "dtype", "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label",
    "label2id", "problem_type", "_name_or_path", "use_cache", "bos_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "initializer_range", "initializer_factor", "tokenizer_class", "prefix",
    "task_specific_params", "finetuning_task", "gradient_checkpointing", "classifier_dropout", "num_labels",
    "pruned_heads", "torchscript", "tie_encoder_decoder", "cross_attention_hidden_size", "add_cross_attention",
    "is_decoder", "output_scores", "return_dict_in_generate", "_attn_implementation_autoset",
}

# HF activation names <-> ours
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}

ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "BertModel": "bert",
    "T5ForConditionalGeneration": "t5",
    "LlamaForCausalLM": "llama",
}  # the families read and written; readers add theirs (supported_architectures)


def _act(name: Any, key: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ConfigError(f"HF config {key}={name!r} is not supported; supported activations: {', '.join(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[name]


class _Reader:
    """Reads a HF config dict, recording which keys were used; leftovers raise."""

    def __init__(self, hf: dict[str, Any], family: str) -> None:
        self.hf, self.family, self.used = hf, family, set(_GENERIC)

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.hf.get(key, default)

    def need(self, key: str) -> Any:
        self.used.add(key)
        if key not in self.hf:
            raise ConfigError(f"HF {self.family} config lacks the required key {key!r}")
        return self.hf[key]

    def expect(self, key: str, allowed: tuple[Any, ...], default: Any = None) -> Any:
        """A key that is only supported at the listed values."""
        value = self.get(key, default)
        if value not in allowed:
            raise ConfigError(
                f"HF {self.family} config {key}={value!r} is not supported (supported: "
                f"{', '.join(repr(a) for a in allowed)}); the converted model would not match"
            )
        return value

    def done(self) -> None:
        unknown = sorted(k for k in self.hf if k not in self.used)
        if unknown:
            raise ConfigError(
                f"HF {self.family} config has keys the converter does not know: {', '.join(unknown)}; "
                "they may change the model, so conversion stops rather than guess"
            )


def family_of_hf(hf: dict[str, Any]) -> str:
    """The family ('gpt2', 'bert', 't5', 'llama', or a reader's: 'vit', ...) of a HF config dict, from its model_type."""
    mt = hf.get("model_type")
    if mt not in FAMILIES + read_only():
        raise ConfigError(
            f"unsupported HF model_type {mt!r} (architectures {hf.get('architectures')}); supported "
            f"model types: {', '.join(FAMILIES + read_only())} (architectures: {', '.join(supported_architectures())})"
        )
    return mt


def _gpt2_from(r: _Reader) -> dict[str, Any]:
    d, heads = r.need("n_embd"), r.need("n_head")
    r.expect("scale_attn_weights", (True,), True)
    r.expect("scale_attn_by_inverse_layer_idx", (False,), False)
    r.get("reorder_and_upcast_attn")  # numerics only: the same result in fp32
    for k in ("summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout", "embd_pdrop"):
        r.get(k)  # only used by the double-heads model / equal to resid dropout here
    inner = r.get("n_inner")
    return dict(
        arch="decoder", vocab_size=r.need("vocab_size"), dim=d, num_layers=r.need("n_layer"),
        max_seq_len=r.get("n_positions", 1024),
        attention=dict(num_heads=heads, bias=True, dropout=float(r.get("attn_pdrop", 0.0))),
        positional=dict(kind="learned"),
        norm=dict(kind="layernorm", eps=float(r.get("layer_norm_epsilon", 1e-5)), placement="pre"),
        ffn=dict(kind="mlp", activation=_act(r.get("activation_function", "gelu_new"), "activation_function"),
                 bias=True, hidden_dim=inner or 4 * d),
        tie_embeddings=bool(r.get("tie_word_embeddings", True)), dropout=float(r.get("resid_pdrop", 0.0)),
        pad_token_id=r.get("pad_token_id"),
    )


def _bert_from(r: _Reader) -> dict[str, Any]:
    r.expect("position_embedding_type", ("absolute",), "absolute")
    r.get("tie_word_embeddings")  # only the MLM head (not converted) ties
    return dict(
        arch="encoder", vocab_size=r.need("vocab_size"), dim=r.need("hidden_size"), num_layers=r.need("num_hidden_layers"),
        max_seq_len=r.get("max_position_embeddings", 512),
        attention=dict(num_heads=r.need("num_attention_heads"), bias=True, dropout=float(r.get("attention_probs_dropout_prob", 0.0))),
        positional=dict(kind="learned"),
        norm=dict(kind="layernorm", eps=float(r.get("layer_norm_eps", 1e-12)), placement="post"),
        ffn=dict(kind="mlp", activation=_act(r.get("hidden_act", "gelu"), "hidden_act"), bias=True, hidden_dim=r.need("intermediate_size")),
        final_norm=False, embed_norm=True, num_token_types=r.get("type_vocab_size", 2),
        dropout=float(r.get("hidden_dropout_prob", 0.0)), pad_token_id=r.get("pad_token_id"),
        head=dict(kind="embedding", pooling="cls", pooler=True, normalize=False),
    )


def _t5_from(r: _Reader) -> dict[str, Any]:
    d, heads = r.need("d_model"), r.need("num_heads")
    proj = r.get("feed_forward_proj", "relu")
    r.get("dense_act_fn"), r.get("is_gated_act")  # derived from feed_forward_proj
    parts = proj.split("-")
    gated = parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated):
        raise ConfigError(f"HF t5 config feed_forward_proj={proj!r} is not 'ACT' or 'gated-ACT'")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    # T5 v1.0 ties the head and scales the decoder output by d ** -0.5; v1.1 checkpoints say
    # tie_word_embeddings=false and have their own head, unscaled (transformers 5 writes the
    # scaling as scale_decoder_outputs)
    tied = r.get("tie_word_embeddings", True) is not False
    scale = r.get("scale_decoder_outputs", tied)
    layers = r.need("num_layers")
    return dict(
        arch="encoder_decoder", vocab_size=r.need("vocab_size"), dim=d, num_layers=layers,
        num_decoder_layers=r.get("num_decoder_layers") or layers, max_seq_len=r.get("n_positions", 512),
        attention=dict(num_heads=heads, head_dim=r.need("d_kv"), scale=1.0),
        positional=dict(kind="t5", options=dict(num_buckets=r.get("relative_attention_num_buckets", 32),
                                                max_distance=r.get("relative_attention_max_distance", 128))),
        norm=dict(kind="rmsnorm", eps=float(r.get("layer_norm_epsilon", 1e-6)), bias=False, placement="pre"),
        ffn=dict(kind="geglu" if gated else "mlp", activation=_act(act, "feed_forward_proj"), bias=False, hidden_dim=r.need("d_ff")),
        tie_embeddings=tied, share_embeddings=True, logit_scale=d**-0.5 if scale else 1.0,
        dropout=float(r.get("dropout_rate", 0.0)), pad_token_id=r.get("pad_token_id"),
    )


def _llama_from(r: _Reader) -> dict[str, Any]:
    d, heads = r.need("hidden_size"), r.need("num_attention_heads")
    rope = r.get("rope_parameters") or {}
    theta = rope.get("rope_theta", r.get("rope_theta", 10000.0))
    r.get("rope_theta")
    if rope.get("rope_type", "default") != "default" or r.get("rope_scaling"):
        raise ConfigError(
            f"HF llama config rope_parameters={rope!r} / rope_scaling={r.get('rope_scaling')!r}: only plain "
            "RoPE (rope_type 'default') is supported"
        )
    extra = sorted(set(rope) - {"rope_type", "rope_theta"})
    if extra:
        raise ConfigError(f"HF llama config rope_parameters has unsupported keys: {', '.join(extra)}")
    r.get("pretraining_tp")  # a sharding detail of the original training, same math
    attn_bias = bool(r.get("attention_bias", False))
    return dict(
        arch="decoder", vocab_size=r.need("vocab_size"), dim=d, num_layers=r.need("num_hidden_layers"),
        max_seq_len=r.get("max_position_embeddings", 2048),
        attention=dict(num_heads=heads, num_kv_heads=r.get("num_key_value_heads") or heads, head_dim=r.get("head_dim") or d // heads,
                       bias=attn_bias, dropout=float(r.get("attention_dropout", 0.0))),
        positional=dict(kind="rope", options=dict(base=float(theta))),
        norm=dict(kind="rmsnorm", eps=float(r.get("rms_norm_eps", 1e-6)), bias=False, placement="pre"),
        ffn=dict(kind="swiglu", activation=_act(r.get("hidden_act", "silu"), "hidden_act"), bias=bool(r.get("mlp_bias", False)),
                 hidden_dim=r.need("intermediate_size")),
        tie_embeddings=bool(r.get("tie_word_embeddings", False)), pad_token_id=r.get("pad_token_id"),
    )


_FROM: dict[str, Callable[[_Reader], dict[str, Any]]] = {"gpt2": _gpt2_from, "bert": _bert_from, "t5": _t5_from, "llama": _llama_from}


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """A ModelConfig equal in function to a HF config dict (the contents of config.json)."""
    family = family_of_hf(hf_config)
    if family in HF_READERS:
        return HF_READERS.get(family).config(hf_config)
    r = _Reader(hf_config, family)
    data = _FROM[family](r)
    r.done()
    return from_dict(ModelConfig, data).validate()


# --------------------------------------------------------------------------- ModelConfig -> HF


def _mismatches(cfg: ModelConfig, want: dict[str, tuple[Any, ...]]) -> list[str]:
    out = []
    for path, allowed in want.items():
        node: Any = cfg
        for part in path.split("."):
            node = getattr(node, part)
        if node not in allowed:
            out.append(f"model.{path}={node!r} (needs {' or '.join(repr(a) for a in allowed)})")
    return out


_NEEDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "gpt2": {
        "arch": ("decoder",), "positional.kind": ("learned",), "positional.options": ({}, {"offset": 0}),
        "norm.kind": ("layernorm",), "norm.placement": ("pre",), "norm.bias": (True, None), "ffn.kind": ("mlp",),
        "ffn.bias": (True,), "attention.bias": (True,), "attention.out_bias": (None, True), "attention.qk_norm": ("none",),
        "attention.scale": (None,), "final_norm": (True,), "embed_norm": (False,), "embed_scale": (1.0,),
        "logit_scale": (1.0,), "num_token_types": (0,),
    },
    "bert": {
        "arch": ("encoder",), "positional.kind": ("learned",), "positional.options": ({}, {"offset": 0}),
        "norm.kind": ("layernorm",), "norm.placement": ("post",), "norm.bias": (True, None), "ffn.kind": ("mlp",),
        "ffn.bias": (True,), "attention.bias": (True,), "attention.out_bias": (None, True), "attention.qk_norm": ("none",),
        "attention.scale": (None,), "final_norm": (False,), "embed_norm": (True,), "embed_scale": (1.0,),
        "head.kind": ("none", "embedding"), "head.pooling": ("cls",),
    },
    "t5": {
        "arch": ("encoder_decoder",), "positional.kind": ("t5",), "norm.kind": ("rmsnorm",), "norm.placement": ("pre",),
        "ffn.kind": ("mlp", "geglu"), "ffn.bias": (False,), "attention.bias": (False,), "attention.out_bias": (None, False),
        "attention.qk_norm": ("none",), "attention.scale": (1.0,),
        "final_norm": (True,), "embed_norm": (False,), "embed_scale": (1.0,), "tie_embeddings": (True,),
        "share_embeddings": (True,), "num_token_types": (0,),
    },
    "llama": {
        "arch": ("decoder",), "positional.kind": ("rope",), "norm.kind": ("rmsnorm",), "norm.placement": ("pre",),
        "ffn.kind": ("swiglu",), "attention.qk_norm": ("none",), "attention.scale": (None,), "final_norm": (True,),
        "embed_norm": (False,), "embed_scale": (1.0,), "logit_scale": (1.0,), "num_token_types": (0,),
    },
}


def family_of(cfg: ModelConfig) -> str:
    """The HF family a ModelConfig can be written as; ConfigError listing the mismatches if none."""
    reasons = []
    for family in FAMILIES:
        bad = _family_mismatches(cfg, family)
        if not bad:
            return family
        reasons.append(f"{family}: {'; '.join(bad)}")
    raise ConfigError("this model has no Hugging Face equivalent among the supported families (" + " | ".join(reasons) + ")")


# what every written family needs: the plain form of each registered part (an attention kind,
# block kind or depth wiring that a Hugging Face family cannot express is refused by name)
_PLAIN: dict[str, tuple[Any, ...]] = {
    "attention.kind": ("mha",), "attention.options": ({},), "block.kind": ("sequential",), "block.options": ({},),
    "depth.kind": ("plain",), "depth.options": ({},),
}


def _family_mismatches(cfg: ModelConfig, family: str) -> list[str]:
    want = {**_PLAIN, **_NEEDS[family]}
    if family != "t5":
        want["num_decoder_layers"] = (None,)
    if family == "t5":
        want["attention.num_kv_heads"] = (None, cfg.attention.num_heads)
    bad = _mismatches(cfg, want)
    a = cfg.attention
    if family in ("gpt2", "bert"):
        if cfg.num_kv_heads != a.num_heads:
            bad.append(f"model.attention.num_kv_heads={a.num_kv_heads} (needs plain multi-head attention)")
        if cfg.head_dim * a.num_heads != cfg.dim:
            bad.append(f"model.attention.head_dim={a.head_dim} (needs dim // num_heads)")
    if family == "llama":
        o = cfg.positional.options
        if o.get("fraction", 1.0) != 1.0 or o.get("interleaved", False) or set(o) - {"base", "fraction", "interleaved"}:
            bad.append(f"model.positional.options={o} (needs full, non-interleaved RoPE)")
        if a.out_bias not in (None, a.bias):
            bad.append(f"model.attention.out_bias={a.out_bias} (needs the same as attention.bias)")
    if family == "t5" and cfg.logit_scale not in (1.0, cfg.dim**-0.5):
        bad.append(f"model.logit_scale={cfg.logit_scale} (needs 1.0 or dim ** -0.5)")
    if cfg.ffn.activation is not None and cfg.ffn.activation not in _ACT_TO_HF:
        bad.append(f"model.ffn.activation={cfg.ffn.activation!r}")
    return bad


def _ffn_hidden(cfg: ModelConfig) -> int:
    from ..nn.feedforward import hidden_size

    return hidden_size(cfg.dim, cfg.ffn.hidden_mult, cfg.ffn.hidden_dim, cfg.ffn.multiple_of)


def config_to_hf(cfg: ModelConfig, family: str | None = None) -> dict[str, Any]:
    """The HF config dict (for config.json) of a ModelConfig; family is inferred when None."""
    family = family or family_of(cfg)
    bad = _family_mismatches(cfg, family)
    if bad:
        raise ConfigError(f"this model cannot be written as a HF {family} config: " + "; ".join(bad))
    a, f = cfg.attention, cfg.ffn
    if family == "gpt2":
        out = dict(
            architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.dim,
            n_layer=cfg.num_layers, n_head=a.num_heads, n_inner=_ffn_hidden(cfg),
            activation_function=_ACT_TO_HF[f.activation or "gelu"], layer_norm_epsilon=cfg.norm.eps,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=a.dropout, tie_word_embeddings=cfg.tie_embeddings,
        )
    elif family == "bert":
        out = dict(
            architectures=["BertModel"], vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers,
            num_attention_heads=a.num_heads, intermediate_size=_ffn_hidden(cfg), hidden_act=_ACT_TO_HF[f.activation or "gelu"],
            max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.num_token_types, layer_norm_eps=cfg.norm.eps,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=a.dropout, position_embedding_type="absolute",
        )
    elif family == "t5":
        act = f.activation or "gelu"
        if f.kind == "geglu":
            if act == "gelu":
                raise ConfigError("HF t5 has no gated exact-GELU feed-forward ('gated-gelu' means the tanh GELU): set model.ffn.activation=gelu_tanh")
            proj = "gated-" + ("gelu" if act == "gelu_tanh" else act)
        else:
            proj = _ACT_TO_HF[act]
        opts = cfg.positional.options
        out = dict(
            architectures=["T5ForConditionalGeneration"], vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.head_dim,
            d_ff=_ffn_hidden(cfg), num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers or cfg.num_layers,
            num_heads=a.num_heads, relative_attention_num_buckets=opts.get("num_buckets", 32),
            relative_attention_max_distance=opts.get("max_distance", 128), layer_norm_epsilon=cfg.norm.eps,
            feed_forward_proj=proj, dropout_rate=cfg.dropout, n_positions=cfg.max_seq_len,
            tie_word_embeddings=cfg.logit_scale != 1.0, is_encoder_decoder=True, decoder_start_token_id=cfg.pad_token_id or 0,
        )
    else:
        out = dict(
            architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=_ffn_hidden(cfg),
            num_hidden_layers=cfg.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, hidden_act=_ACT_TO_HF[f.activation or "silu"], max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm.eps, rope_parameters=dict(rope_type="default", rope_theta=float(cfg.positional.options.get("base", 10000.0))),
            attention_bias=a.bias, mlp_bias=f.bias, attention_dropout=a.dropout, tie_word_embeddings=cfg.tie_embeddings,
        )
    out["model_type"] = family
    if cfg.pad_token_id is not None:
        out["pad_token_id"] = cfg.pad_token_id
    return out


__all__ = ["ARCHITECTURES", "FAMILIES", "HF_READERS", "HFReader", "config_from_hf", "config_to_hf", "family_of", "family_of_hf"]
