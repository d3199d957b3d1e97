"""`anyformer inspect attention`: maps equal to softmax(QK^T) computed naively from the
model's own projections, the head statistics against their formulas, the grid PNG, errors."""

from __future__ import annotations

import math

import pytest
import torch

from anyformer.config import apply_overrides
from anyformer.models.builders import build_model
from anyformer.training import Trainer
from anyformer.training.config import default_run_config
from anyformer.training.inspect import attention_maps, head_statistics, plot_attention_grid
from tests.training_helpers import tiny_config


def decoder(kind: str = "mha", positional: str = "none"):
    cfg = apply_overrides(default_run_config().model, {
        "vocab_size": 50, "dim": 32, "num_layers": 2, "attention.num_heads": 4, "ffn.hidden_dim": 64,
        "max_seq_len": 32, "attention.kind": kind, "positional.kind": positional})
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_maps_equal_a_naive_softmax_of_the_projections() -> None:
    model = decoder()
    tokens = torch.randint(0, 50, (1, 9))
    seen = {}
    attn = model.stack.blocks[0].attn
    def keep_input(module, args) -> None:
        seen.setdefault("h", args[0])

    attn.sublayer.register_forward_pre_hook(keep_input)
    maps = attention_maps(model, tokens)
    assert len(maps) == 2 and maps[0].shape == (4, 9, 9)
    h = seen["h"][0]  # the normed input of layer 0's attention, (n, d)
    q = attn.sublayer.q_proj(h).view(9, 4, 8).transpose(0, 1)
    k = attn.sublayer.k_proj(h).view(9, 4, 8).transpose(0, 1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(8)
    logits = logits.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(maps[0], logits.softmax(-1), atol=1e-5, rtol=1e-5)


def test_head_statistics_follow_their_formulas() -> None:
    w = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])  # one head
    entropy, distance = head_statistics([w])
    rows = [0.0, -2 * 0.5 * math.log(0.5), -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))]
    assert float(entropy[0, 0]) == pytest.approx(sum(rows) / 3)
    assert float(distance[0, 0]) == pytest.approx((0 + 0.5 * 1 + (0.2 * 2 + 0.3 * 1)) / 3)


def test_a_model_without_weights_to_hand_over_is_named() -> None:
    """(Every registered kind's maps: tests/conformance/test_attention.py.)"""
    from types import SimpleNamespace

    class NoWeights(torch.nn.Module):  # a kind that never forms its weights
        config = SimpleNamespace(attention=SimpleNamespace(kind="sketch"))

        def forward(self, x, attn_store=None):
            return x

    with pytest.raises(ValueError, match="'sketch' never forms its attention weights"):
        attention_maps(NoWeights(), torch.zeros(1, 3))

    class NoStore(torch.nn.Module):  # a forward that takes no attn_store at all
        config = SimpleNamespace(arch="bytes")

        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="architecture 'bytes' does not hand over its attention weights"):
        attention_maps(NoStore(), torch.zeros(1, 3))


def test_grid_png_and_command(tmp_path, capsys) -> None:
    from PIL import Image

    from anyformer.cli import main

    maps = attention_maps(decoder(), torch.randint(0, 50, (1, 6)))
    png = plot_attention_grid(maps, tmp_path / "grid.png", list("abcdef"))
    width, height = Image.open(png).size
    assert width > height  # 2 layers (rows) x 4 heads (columns)
    Trainer(tiny_config(tmp_path), run_dir=tmp_path / "run", verbose=False).fit()
    assert main(["inspect", "attention", str(tmp_path / "run"), "--prompt", "To be, or not"]) == 0
    out = capsys.readouterr().out
    assert "2 layers x 2 heads, 13 tokens" in out and (tmp_path / "run" / "attention.png").is_file()
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert main(["inspect", "attention", str(tmp_path / "run")]) != 0
    assert "--prompt" in capsys.readouterr().err
