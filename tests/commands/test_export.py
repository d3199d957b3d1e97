"""Export to Hugging Face is exact or refused: for every registered attention kind, positional
kind, norm placement, encoder head, block kind and depth wiring, `save_pretrained` either writes
a checkpoint whose logits equal ours in transformers and after reloading in anyformer, or
refuses with a message naming the setting."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers

import anyformer
from anyformer import build_model, preset
from anyformer.config import ConfigError
from anyformer.models.registry import BLOCKS, DEPTHS, HEADS
from anyformer.nn.attention import ATTENTIONS
from anyformer.nn.block import PLACEMENTS
from anyformer.nn.positional import POSITIONALS

TOL = 1e-5

# (setting, base preset): decoder settings on Llama's shape, encoder heads and placements on BERT's
CASES = (
    [("attention.kind", k, "llama-tiny") for k in ATTENTIONS.names()]
    + [("positional.kind", k, "llama-tiny") for k in POSITIONALS.names()]
    + [("norm.placement", k, base) for k in PLACEMENTS.names() for base in ("llama-tiny", "bert-tiny")]
    + [("head.kind", k, "bert-tiny") for k in HEADS.names()]
    + [("block.kind", k, "llama-tiny") for k in BLOCKS.names()]
    + [("depth.kind", k, "llama-tiny") for k in DEPTHS.names()]
)


def _model(setting: str, value: str, base: str) -> torch.nn.Module:
    section, key = setting.split(".")
    overrides: dict = {section: {key: value}}
    if setting == "attention.kind":
        overrides["attention"]["num_kv_heads"] = None  # kinds that need one value head per query head build too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(preset(base, num_layers=2, vocab_size=100, **overrides))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _outputs(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    if model.config.arch == "encoder":  # the hidden states (BertModel's last_hidden_state)
        return model.hidden(tokens)
    return model(tokens)


@torch.no_grad()
@pytest.mark.parametrize("setting,value,base", CASES, ids=[f"{s}={v}@{b}" for s, v, b in CASES])
def test_export_round_trips_or_refuses_naming_the_setting(setting: str, value: str, base: str, tmp_path: Path) -> None:
    try:
        model = _model(setting, value, base)
    except (ConfigError, ValueError) as e:
        pytest.skip(f"{setting}={value} does not build on {base}: {e}")
    tokens = torch.randint(1, 100, (2, 9))
    try:
        anyformer.save_pretrained(model, tmp_path)
    except ConfigError as e:
        assert f"model.{setting}={value!r}" in str(e), str(e)
        return
    ours = _outputs(model, tokens)
    if model.config.arch == "decoder":
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()(tokens).logits
    else:
        theirs = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()(tokens).last_hidden_state
    assert (ours - theirs).abs().max().item() <= TOL
    again = anyformer.from_pretrained(tmp_path)
    assert (_outputs(again, tokens) - ours).abs().max().item() <= TOL


def test_each_refusal_lists_every_setting_it_cannot_write() -> None:
    model = _model("attention.kind", "linear", "llama-tiny")
    model.config.block.kind = "parallel"
    with pytest.raises(ConfigError) as e:
        anyformer.save_pretrained(model, "/tmp/never-written")
    assert "model.attention.kind='linear'" in str(e.value) and "model.block.kind='parallel'" in str(e.value)
