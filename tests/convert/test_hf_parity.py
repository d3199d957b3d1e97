"""Parity with Hugging Face transformers: tiny random-weight GPT-2, BERT, T5 and Llama models
are converted with anyformer.convert and must give the same outputs (fp32, max abs diff <= 1e-5),
and HF -> ours -> HF must give back the same state dict."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import transformers

from anyformer.config import ConfigError
from anyformer.convert import ConversionError, config_from_hf, model_from_hf, state_dict_from_hf, state_dict_to_hf

TOL = 1e-5
V = 100


def _tokens(b: int, n: int) -> torch.Tensor:
    return torch.randint(0, V, (b, n))


def _padding(b: int, n: int) -> torch.Tensor:
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, n - 3 :] = 0  # the second sequence is three tokens shorter
    return mask


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values in every parameter (HF initialises norms to ones and biases to zeros)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64, attn_implementation="eager")
    return _randomize(transformers.GPT2LMHeadModel(cfg))


def bert():
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=V,
        max_position_embeddings=64, attn_implementation="eager",
    )
    return _randomize(transformers.BertModel(cfg))


def t5(proj: str = "relu"):
    cfg = transformers.T5Config(
        d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4, vocab_size=V,
        feed_forward_proj=proj, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        attn_implementation="eager",
    )
    return _randomize(transformers.T5ForConditionalGeneration(cfg))


def llama(tied: bool = False):
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, max_position_embeddings=64, rope_theta=500.0, tie_word_embeddings=tied, attn_implementation="eager",
    )
    return _randomize(transformers.LlamaForCausalLM(cfg))


def _convert(hf: torch.nn.Module) -> torch.nn.Module:
    return model_from_hf(hf.config.to_dict(), hf.state_dict())


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOL


@torch.no_grad()
def test_gpt2_logits_match() -> None:
    hf = gpt2()
    ours = _convert(hf)
    tok = _tokens(2, 9)
    _close(ours(tok), hf(tok).logits)


@torch.no_grad()
def test_bert_hidden_states_match_with_padding_and_token_types() -> None:
    hf = bert()
    ours = _convert(hf)
    tok, mask = _tokens(2, 9), _padding(2, 9)
    types = torch.zeros(2, 9, dtype=torch.long)
    types[:, 5:] = 1
    out = hf(tok, attention_mask=mask, token_type_ids=types)
    _close(ours.hidden(tok, mask, token_types=types), out.last_hidden_state)
    _close(ours(tok, mask, token_types=types), out.pooler_output)


@torch.no_grad()
@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_t5_logits_match_with_padding(proj: str) -> None:
    hf = t5(proj)
    ours = _convert(hf)
    src, mask, tgt = _tokens(2, 9), _padding(2, 9), _tokens(2, 6)
    _close(ours(src, tgt, mask), hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits)


@torch.no_grad()
@pytest.mark.parametrize("tied", [False, True])
def test_llama_gqa_logits_match(tied: bool) -> None:
    hf = llama(tied)
    ours = _convert(hf)
    assert ours.config.num_kv_heads == 2 < ours.config.attention.num_heads
    tok = _tokens(2, 9)
    _close(ours(tok), hf(tok).logits)


@pytest.mark.parametrize("make", [gpt2, bert, lambda: t5("gated-gelu"), llama], ids=["gpt2", "bert", "t5", "llama"])
def test_hf_to_ours_to_hf_state_dict_is_identical(make) -> None:
    hf = make()
    family = hf.config.model_type
    cfg = config_from_hf(hf.config.to_dict())
    want = hf.state_dict()
    back = state_dict_to_hf(family, state_dict_from_hf(family, want, cfg), cfg)
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        assert torch.equal(back[k], v), k


def test_unknown_config_key_is_named() -> None:
    cfg = gpt2().config.to_dict() | {"mystery_switch": True}
    with pytest.raises(ConfigError, match="mystery_switch"):
        config_from_hf(cfg)


def test_unsupported_config_value_is_named() -> None:
    cfg = gpt2().config.to_dict() | {"scale_attn_by_inverse_layer_idx": True}
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        config_from_hf(cfg)
    with pytest.raises(ConfigError, match="model_type 'gpt_neox'"):
        config_from_hf({"model_type": "gpt_neox"})


def test_unmapped_and_missing_tensors_are_named() -> None:
    hf = llama()
    cfg = config_from_hf(hf.config.to_dict())
    sd = dict(hf.state_dict())
    with pytest.raises(ConversionError, match="score.weight"):
        state_dict_from_hf("llama", sd | {"score.weight": torch.zeros(2, 32)}, cfg)
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match="model.layers.1.mlp.up_proj.weight"):
        state_dict_from_hf("llama", sd, cfg)


def test_misshapen_tensor_is_named() -> None:
    hf = gpt2()
    cfg = config_from_hf(hf.config.to_dict())
    sd = dict(hf.state_dict())
    sd["transformer.wpe.weight"] = torch.zeros(10, 32)
    with pytest.raises(ConversionError, match="positional.table.weight"):
        state_dict_from_hf("gpt2", sd, cfg)


@torch.no_grad()
def test_t5_v1_1_untied_head_is_read() -> None:
    """A T5 v1.1 checkpoint: own lm_head, no d ** -0.5 output scaling (tie_word_embeddings=false)."""
    hf = t5("gated-gelu")
    hf.config.scale_decoder_outputs = False
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32) * 0.1)  # untie from the shared embedding
    cfg = hf.config.to_dict() | {"tie_word_embeddings": False}
    cfg.pop("scale_decoder_outputs")  # as in configs saved before transformers 5
    ours = model_from_hf(cfg, hf.state_dict())
    assert not ours.config.tie_embeddings and ours.config.logit_scale == 1.0
    src, tgt = _tokens(2, 7), _tokens(2, 4)
    _close(ours(src, tgt), hf(input_ids=src, decoder_input_ids=tgt).logits)
