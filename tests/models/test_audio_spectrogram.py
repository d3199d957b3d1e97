"""The Audio Spectrogram Transformer (arch `ast`, anyformer/models/audio_spectrogram.py) against
Hugging Face's ASTForAudioClassification on the same random weights, its options' checks, and
its patch grid against the convolution arithmetic."""

from __future__ import annotations

import pytest
import torch

from anyformer import ConfigError, ModelConfig, build_model
from anyformer.convert.audio_spectrogram import ast_config_from_hf, ast_state_dict_from_hf

transformers = pytest.importorskip("transformers")


def hf_model() -> torch.nn.Module:
    cfg = transformers.ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_mel_bins=16,
                                 max_length=24, patch_size=4, frequency_stride=3, time_stride=3, num_labels=5)
    torch.manual_seed(0)
    model = transformers.ASTForAudioClassification(cfg).eval()
    with torch.no_grad():  # random tokens and positions (they start at zero)
        for name, p in model.named_parameters():
            if "token" in name or "position" in name:
                p.normal_(0, 0.5)
    return model


def test_logits_equal_hugging_face_ast() -> None:
    hf = hf_model()
    cfg = ast_config_from_hf(hf.config.to_dict())
    ours = build_model(cfg).eval()
    ours.load_state_dict(ast_state_dict_from_hf(hf.state_dict(), cfg), strict=True)
    spectrograms = torch.randn(3, 24, 16)  # (batch, frames, mel bins), as HF's input_values
    with torch.no_grad():
        want = hf(input_values=spectrograms).logits
        got = ours(spectrograms)
    assert got.shape == (3, 5) and torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_patch_grid_and_options() -> None:
    cfg = ModelConfig(arch="ast", dim=32, attention={"num_heads": 4}, positional={"kind": "learned"}, max_seq_len=64,
                      options={"mel_bins": 16, "frames": 24, "patch_size": 4, "frequency_stride": 3, "time_stride": 3})
    assert cfg.arch_options.grid == ((16 - 4) // 3 + 1, (24 - 4) // 3 + 1) and cfg.arch_options.num_tokens == 5 * 7 + 2
    with pytest.raises(ConfigError, match="shorter than the 37 tokens"):
        ModelConfig(**{**cfg.__dict__, "max_seq_len": 36}).validate()
    with pytest.raises(ConfigError, match="patch_size=20 is larger than the spectrogram"):
        ModelConfig(**{**cfg.__dict__, "options": {**cfg.options, "patch_size": 20}}).validate()
    model = build_model(cfg)
    with pytest.raises(ValueError, match=r"expected \(batch, 24 frames, 16 mel bins\)"):
        model(torch.randn(2, 16, 24))


def test_from_pretrained_reads_a_hugging_face_ast_directory(tmp_path) -> None:
    """save_pretrained's folder (config.json + model.safetensors) loads through
    anyformer.from_pretrained, with transformers' logits; the reader is one registration in
    anyformer/convert/audio_spectrogram.py."""
    import anyformer

    hf = hf_model()
    hf.save_pretrained(tmp_path / "ast")
    ours = anyformer.from_pretrained(tmp_path / "ast")
    spectrograms = torch.randn(2, 24, 16)
    with torch.no_grad():
        assert torch.allclose(ours(spectrograms), hf(input_values=spectrograms).logits, atol=1e-5)


def test_strides_and_patches_of_one_are_allowed() -> None:
    from anyformer import ModelConfig
    from anyformer.models.audio_spectrogram import AstOptions

    cfg = ModelConfig(arch="ast", dim=16, max_seq_len=4096, attention={"num_heads": 2},
                      options={"mel_bins": 4, "frames": 6, "patch_size": 1, "frequency_stride": 1, "time_stride": 1})
    AstOptions(mel_bins=4, frames=6, patch_size=1, frequency_stride=1, time_stride=1).validate(cfg)


def test_the_default_patching_is_the_papers_1212_patches() -> None:
    """By default a 1024-frame, 128-bin spectrogram is cut into 16 x 16 patches every 10 bins and
    10 frames: 12 x 101 = 1212 patches (Gong et al. 2021, AST's ImageNet-pretrained setting), plus
    the class and distillation tokens."""
    from anyformer.models.audio_spectrogram import AstOptions

    assert AstOptions().grid == (12, 101) and AstOptions().num_tokens == 1214
