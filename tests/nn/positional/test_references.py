"""Positional encodings and the sandwich placement against references that share no code with
the library: the papers' formulas written as loops, and Hugging Face's implementations
(BLOOM's ALiBi, DistilBERT's sinusoidal table, GPT-J's interleaved rotary embedding): tests of
anyformer/nn/positional/bias.py, anyformer/nn/positional/absolute.py and
anyformer/nn/positional/rope.py."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.distilbert.modeling_distilbert import create_sinusoidal_embeddings
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_rotary
from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions as gptj_table

from anyformer import ModelConfig, build_model
from anyformer.nn.positional import POSITIONALS, PositionalContext
from anyformer.nn.positional.absolute import sinusoidal_table
from anyformer.nn.positional.bias import alibi_bias, alibi_slopes


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 40, 64])
def test_alibi_slopes_equal_blooms(heads: int) -> None:
    alibi = build_alibi_tensor(torch.ones(1, 3, dtype=torch.long), heads, torch.float64)  # (h, 1, 3): slope x position
    torch.testing.assert_close(alibi_slopes(heads).double(), alibi[:, 0, 1], rtol=1e-6, atol=0)  # ours are fp32


def test_alibi_slopes_of_eight_heads_are_the_papers() -> None:
    # Press et al. 2022, section 3: for 8 heads, 1/2^1 ... 1/2^8
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]


def test_alibi_bias_is_minus_slope_times_distance() -> None:
    q_pos, k_pos = torch.tensor([[3, 4]]), torch.tensor([[0, 1, 2, 3, 4]])
    slopes = torch.tensor([0.5, 0.25])
    bias = alibi_bias(q_pos, k_pos, slopes)
    for h in range(2):
        for i in range(2):
            for j in range(5):
                assert bias[0, h, i, j].item() == -float(slopes[h]) * abs(int(q_pos[0, i]) - int(k_pos[0, j]))


@pytest.mark.parametrize("dim", [8, 64, 10])
def test_sinusoidal_table_is_the_papers_formula(dim: int) -> None:
    # Vaswani et al. 2017, section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)
    table = sinusoidal_table(torch.arange(50), dim)
    for pos in range(50):
        for c in range(dim):
            angle = pos / 10000 ** (2 * (c // 2) / dim)
            want = math.sin(angle) if c % 2 == 0 else math.cos(angle)
            assert abs(table[pos, c].item() - want) < 1e-5, (pos, c)
    theirs = torch.empty(50, dim)
    create_sinusoidal_embeddings(50, dim, theirs)  # DistilBERT's table
    torch.testing.assert_close(table, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_interleaved_rope_equals_gptj(fraction: float) -> None:
    heads, head_dim, n = 2, 16, 11
    ctx = PositionalContext(dim=heads * head_dim, num_heads=heads, head_dim=head_dim, max_seq_len=64, causal=True)
    cls = POSITIONALS.get("rope")
    rope = cls(ctx, cls.Options(interleaved=True, fraction=fraction))
    q, k = torch.randn(2, 1, heads, n, head_dim).unbind(0)
    pos = torch.arange(5, 5 + n)[None]
    ours_q, ours_k = rope.rotate(q, k, pos, pos)
    rot = int(head_dim * fraction)
    sincos = gptj_table(64, rot)[pos]  # (1, n, rot)
    sin, cos = torch.split(sincos, rot // 2, dim=-1)
    for ours, x in ((ours_q, q), (ours_k, k)):
        x = x.transpose(1, 2)  # GPT-J's layout (b, n, h, d)
        want = torch.cat([gptj_rotary(x[..., :rot], sin, cos), x[..., rot:]], dim=-1).transpose(1, 2)
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def test_sandwich_placement_is_norm_out_of_the_sublayer_of_norm_in() -> None:
    """x + out_norm(f(norm(x))) around attention and feed-forward (CogView; Gemma 2's pre and
    post norms), composed in the test from the model's own sublayers and norms."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=40, dim=32, num_layers=2, max_seq_len=16, norm={"placement": "sandwich"},
                                    attention={"num_heads": 4}, positional={"kind": "none"})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms away from the identity
    tokens = torch.randint(0, 40, (2, 9))
    wrapped = [m for m in model.modules() if type(m).__name__ == "SandwichNorm"]
    assert len(wrapped) == 4  # attention and feed-forward of both layers
    from anyformer.nn.attention import AttentionContext

    pos = torch.arange(9).expand(2, 9)
    ctx = AttentionContext(q_pos=pos, k_pos=pos, causal=True)
    with torch.no_grad():
        x = model.embed.tokens(tokens)
        for attn, ffn in zip(wrapped[0::2], wrapped[1::2]):
            x = x + attn.out_norm(attn.sublayer(attn.norm(x), ctx))
            x = x + ffn.out_norm(ffn.sublayer(ffn.norm(x)))
        want = model.lm_head(model.stack.final_norm(x))
        torch.testing.assert_close(model(tokens), want, atol=1e-5, rtol=1e-5)
