"""Bad input to the Python API, as a new user would give it: each raises a library error
(ConfigError, ValueError or FileNotFoundError) whose message names the problem, never an
AttributeError, TypeError or KeyError from deep inside."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import anyformer
from anyformer import ModelConfig, build_model, from_pretrained, preset
from anyformer.config import AttentionConfig, ConfigError, apply_overrides
from anyformer.generation import generate


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "decoder": build_model(ModelConfig(vocab_size=50, dim=32, num_layers=1, max_seq_len=32)).eval(),
        "encoder": build_model(ModelConfig(arch="encoder", vocab_size=50, dim=32, num_layers=1)).eval(),
        "seq2seq": build_model(ModelConfig(arch="encoder_decoder", vocab_size=50, dim=32, num_layers=1)).eval(),
    }


def _files(tmp: Path) -> dict[str, Path]:
    (tmp / "notgguf.bin").write_text("hi")
    (tmp / "empty").mkdir(exist_ok=True)
    return {"notgguf": tmp / "notgguf.bin", "empty": tmp / "empty"}


# (name, call(models, files), message fragment)
CASES = [
    ("unknown top-level key", lambda m, f: ModelConfig(dims=64), "model.dims"),
    ("unknown nested key", lambda m, f: ModelConfig(attention={"num_head": 4}), "model.attention.num_head"),
    ("unknown attention kind", lambda m, f: AttentionConfig(kind="flash"), "unknown attention kind 'flash'"),
    ("unknown kernel", lambda m, f: AttentionConfig(kernel="flash2"), "unknown attention kernel 'flash2'"),
    ("wrong type", lambda m, f: ModelConfig(dim="64"), "model.dim: expected an integer"),
    ("unknown architecture", lambda m, f: ModelConfig(arch="gpt"), "unknown architecture 'gpt'"),
    ("bad literal", lambda m, f: ModelConfig(norm={"placement": "middle"}), "model.norm.placement"),
    ("unknown feed-forward", lambda m, f: ModelConfig(ffn={"kind": "moe"}), "unknown feed-forward 'moe'"),
    ("unknown positional", lambda m, f: ModelConfig(positional={"kind": "xpos"}), "unknown positional encoding 'xpos'"),
    ("unknown block kind", lambda m, f: ModelConfig(block={"kind": "moe"}), "unknown block kind 'moe'"),
    ("heads do not divide dim", lambda m, f: build_model(ModelConfig(dim=30, attention={"num_heads": 4})), "not divisible"),
    ("unknown preset", lambda m, f: preset("gpt5"), "unknown model preset 'gpt5'"),
    ("preset unknown override", lambda m, f: preset("llama-tiny", dims=3), "model.dims"),
    ("unknown variant option", lambda m, f: build_model(preset("llama-tiny", attention={"kind": "hyper", "options": {"blok": 3}})), "blok"),
    ("options for a kind without", lambda m, f: build_model(preset("llama-tiny", attention={"options": {"window": 3}})), "takes no options"),
    ("bad dotted override", lambda m, f: apply_overrides(ModelConfig(), ["attention.nope=1"]), "attention.nope"),
    ("bad override value", lambda m, f: apply_overrides(ModelConfig(), ["dim=abc"]), "expected an integer"),
    ("1-D tokens", lambda m, f: m["decoder"](torch.tensor([1, 2, 3])), "add a batch dimension"),
    ("float tokens", lambda m, f: m["decoder"](torch.ones(1, 3)), "integer token ids"),
    ("token outside vocabulary", lambda m, f: m["decoder"](torch.tensor([[1, 99]])), "outside the vocabulary"),
    ("empty tokens", lambda m, f: m["decoder"](torch.zeros(1, 0, dtype=torch.long)), "empty"),
    ("mask of another shape", lambda m, f: m["decoder"](torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3)), "attention_mask has shape"),
    ("generate with an encoder", lambda m, f: generate(m["encoder"], [[1, 2]]), "needs a model that decodes"),
    ("seq2seq without a start token", lambda m, f: generate(m["seq2seq"], [[1, 2]]), "decoder_start_token_id"),
    ("negative max_new_tokens", lambda m, f: generate(m["decoder"], [[1, 2]], max_new_tokens=-1), "max_new_tokens"),
    ("negative temperature", lambda m, f: generate(m["decoder"], [[1, 2]], temperature=-1.0), "temperature"),
    ("empty prompt", lambda m, f: generate(m["decoder"], [[]]), "empty prompt"),
    ("past the context", lambda m, f: generate(m["decoder"], [[1, 2]], max_new_tokens=10_000), "max_seq_len"),
    ("top_p above 1", lambda m, f: generate(m["decoder"], [[1]], top_p=2.0), "top_p"),
    ("unknown generation setting", lambda m, f: generate(m["decoder"], [[1]], temprature=0.5), "unknown generation setting"),
    ("zero beams", lambda m, f: generate(m["decoder"], [[1]], num_beams=0), "num_beams"),
    ("float prompt", lambda m, f: generate(m["decoder"], torch.ones(1, 2)), "integer token ids"),
    ("missing checkpoint", lambda m, f: from_pretrained("/nonexistent/model"), "does not exist"),
    ("file that is not GGUF", lambda m, f: from_pretrained(f["notgguf"]), "not a GGUF file"),
    ("folder without config", lambda m, f: from_pretrained(f["empty"]), "config.json"),
    ("unknown dtype", lambda m, f: from_pretrained(f["empty"], dtype="int8"), "unknown dtype 'int8'"),
    ("export of a linear-attention model", lambda m, f: anyformer.save_pretrained(build_model(preset("llama-tiny", attention={"kind": "linear"})), "/tmp/x"), "model.attention.kind='linear'"),
]


@pytest.mark.parametrize("name,call,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_library_error_naming_the_problem(name, call, fragment, models, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:
            call(models, _files(tmp_path))
    err = info.value
    assert isinstance(err, (ConfigError, ValueError, FileNotFoundError)), f"{type(err).__name__}: {err}"
    assert not isinstance(err, (AttributeError, TypeError, KeyError)), f"{type(err).__name__}: {err}"
    assert fragment in str(err), str(err)


def test_the_table_covers_at_least_25_inputs() -> None:
    assert len(CASES) >= 25


def test_preset_section_overrides_merge_and_a_switched_kind_drops_its_options() -> None:
    base = preset("llama-tiny")
    linear = preset("llama-tiny", attention={"kind": "linear"})
    assert linear.attention.kind == "linear"
    assert (linear.attention.num_heads, linear.attention.num_kv_heads) == (base.attention.num_heads, base.attention.num_kv_heads)
    assert linear.positional == base.positional and linear.ffn == base.ffn
    hyper = preset("llama-tiny", attention={"kind": "hyper", "options": {"block_size": 8}})
    with pytest.warns(UserWarning, match="dropping the options of 'hyper' \\(block_size\\)"):
        back = apply_overrides(hyper, ["--attention.kind=mha"])
    assert back.attention.options == {} and back.attention.num_kv_heads == base.attention.num_kv_heads
    kept = apply_overrides(hyper, ["--attention.kind=hyper", "--attention.options.block_size=16"])  # options given: kept
    assert kept.attention.options == {"block_size": 16}
