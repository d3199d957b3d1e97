"""GGUF reading: a tiny Llama written to GGUF here (F32 and Q8_0 tensors, llama.cpp's q/k row
order) loads back to the original Hugging Face weights, and into anyformer with transformers' logits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import gguf
import transformers

from anyformer.cli import main  # noqa: E402
from anyformer.config import ConfigError  # noqa: E402
from anyformer.pretrained import from_pretrained, gguf_metadata, load_gguf  # noqa: E402
from anyformer.pretrained.gguf import unpermute_rope_rows  # noqa: E402

HEADS, KV_HEADS, DIM, LAYERS, FFN, VOCAB = 4, 2, 64, 2, 96, 96
TOKENS = [chr(c) for c in range(33, 127)] + ["Ġ", "<eos>"]  # printable ASCII, space (byte-level), an end token


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): HF rows -> interleaved RoPE rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_llama_gguf(path: Path, model: torch.nn.Module, *, quantize: bool, arch: str = "llama") -> None:
    """Write a HF LlamaForCausalLM as llama.cpp would: renamed, q/k permuted, 2-d weights optionally Q8_0."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)  # one byte-level BPE token per character, no merges
    w.add_token_types([1] * (VOCAB - 1) + [3])
    w.add_token_merges([])
    w.add_eos_token_id(VOCAB - 1)
    for name, t in model.state_dict().items():
        a = t.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            module, suffix = rest.rsplit(".", 1)
            out = f"blk.{i}.{GGUF_NAMES[module]}.{suffix}"
            if module == "self_attn.q_proj":
                a = llama_cpp_permute(a, cfg.num_attention_heads)
            if module == "self_attn.k_proj":
                a = llama_cpp_permute(a, cfg.num_key_value_heads)
        else:
            out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}[name]
        if quantize and a.ndim == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(out, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(out, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def hf_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a misplaced norm weight shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def test_unpermute_inverts_llama_cpp(hf_llama: torch.nn.Module) -> None:
    x = np.random.default_rng(0).standard_normal((6 * 16, 5)).astype(np.float32)
    for heads in (1, 3, 6):
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(x, heads), heads), x)
    assert not np.array_equal(llama_cpp_permute(x, 3), x)
    with pytest.raises(ConfigError, match="multiple of 2"):
        unpermute_rope_rows(x[:10], 3)


def test_f32_gguf_restores_hf_weights(hf_llama: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, hf_llama, quantize=False)
    ck = load_gguf(path)
    ref = hf_llama.state_dict()
    assert set(ck.state_dict) == set(ref)
    for name, t in ck.state_dict.items():
        assert torch.equal(t, ref[name]), name
    assert ck.config["num_key_value_heads"] == KV_HEADS and ck.config["tie_word_embeddings"] is False
    assert load_gguf(path, dtype=torch.bfloat16).state_dict["lm_head.weight"].dtype == torch.bfloat16


@pytest.fixture(scope="module")
def q8_gguf(hf_llama: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A Q8_0 GGUF of the tiny Llama, and transformers' own model loaded from it."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-q8.gguf"
    write_llama_gguf(path, hf_llama, quantize=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return path, ref


def test_q8_gguf_matches_transformers_loader(hf_llama: torch.nn.Module, q8_gguf: tuple[Path, torch.nn.Module]) -> None:
    path, ref = q8_gguf
    ck = load_gguf(path)
    for name, t in ref.state_dict().items():
        assert torch.equal(ck.state_dict[name], t), name
    quant_error = (ck.state_dict["model.layers.0.self_attn.q_proj.weight"] - hf_llama.model.layers[0].self_attn.q_proj.weight).abs().max()
    assert 0 < quant_error < 1e-3  # Q8_0 is lossy but close
    ours = from_pretrained(path)
    tokens = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits, atol=1e-5, rtol=1e-5)


def test_convert_command_writes_a_directory_transformers_loads(q8_gguf: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, ref = q8_gguf
    out = tmp_path / "hf"
    assert main(["convert", str(path), str(out)]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, ref(tokens).logits, atol=1e-5, rtol=1e-5)
    assert main(["convert", str(path), str(out)]) == 2  # refuses to overwrite without --force
    assert main(["convert", str(path), str(out), "--force", "--dtype", "bfloat16"]) == 0
    assert from_pretrained(out).lm_head.proj.weight.dtype == torch.float32  # loads to fp32 from a bf16 file


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "missing.gguf")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"is a file \(\.txt\) but not a GGUF file"):
        from_pretrained(tmp_path / "notes.txt")
    (tmp_path / "random.gguf").write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(ValueError, match="not a GGUF file"):
        from_pretrained(tmp_path / "random.gguf")
    (tmp_path / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_gguf(tmp_path / "truncated.gguf")


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_metadata(path)["general.architecture"] == "mamba"
    with pytest.raises(ConfigError, match="GGUF architecture 'mamba' is not supported; supported: llama"):
        from_pretrained(path)
