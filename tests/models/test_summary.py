"""The model summary's activation memory against the formula of Korthikanti et al. 2022 worked
out by hand: s b d (34 + 5 h s / d) bytes per layer at 16 bits, plus fp32 logits and their
gradient, over every layer of every stack."""

from __future__ import annotations

import pytest

from anyformer import ModelConfig
from anyformer.models.summary import activation_bytes


def test_activation_memory_is_the_papers_formula_over_every_layer() -> None:
    # s = 16, b = 2, d = 64, h = 4: 16 * 2 * 64 * (34 + 5 * 4 * 16 / 64) = 2048 * 39 = 79,872 bytes
    # per layer; logits and their gradient 2 * 2 * 16 * 100 * 4 = 25,600 bytes
    decoder = ModelConfig(vocab_size=100, dim=64, num_layers=2, attention={"num_heads": 4})
    assert activation_bytes(decoder, 2, 16) == 2 * 79_872 + 25_600
    both = ModelConfig(arch="encoder_decoder", vocab_size=100, dim=64, num_layers=2, num_decoder_layers=3, attention={"num_heads": 4})
    assert activation_bytes(both, 2, 16) == 5 * 79_872 + 25_600  # the encoder's 2 layers and the decoder's 3
    assert activation_bytes(decoder, 2, 16, bytes_per_value=4) == 2 * 2 * 79_872 + 25_600  # fp32 activations


def test_the_kaplan_count_runs_attention_over_both_stacks_of_an_encoder_decoder() -> None:
    """Without declared mixing, FLOPs per token are 2N + 2 x 2 x layers x context x (h d) + the
    head's 2 d V (Kaplan et al. 2020), context halved under a causal mask; an encoder-decoder's
    layers are its encoder's and its decoder's: here 2 + 3 layers, width 64 (4 heads of 16),
    a 100-token context halved to 50, vocabulary 1000, N = 10^5."""
    from anyformer.models.summary import flops_per_token

    cfg = ModelConfig(arch="encoder_decoder", dim=64, num_layers=2, num_decoder_layers=3, vocab_size=1000, attention={"num_heads": 4})
    assert flops_per_token(cfg, 100_000, 100) == 2 * 100_000 + 2 * 2 * 5 * 50 * 64 + 2 * 64 * 1000
    decoder = ModelConfig(arch="decoder", dim=64, num_layers=2, vocab_size=1000, attention={"num_heads": 4})
    assert flops_per_token(decoder, 100_000, 100, extra_layers=1) == 2 * 100_000 + 2 * 2 * 3 * 50 * 64 + 2 * 64 * 1000


@pytest.mark.parametrize("arch, positional", [("encoder_decoder", "shaw"), ("decoder", "none"), ("decoder", "shaw")])
def test_positional_costs_reach_self_attention_only(arch: str, positional: str) -> None:
    """A decoding step in narrow layers over 256 positions, where Shaw's relative tables are a
    fifth of the work: the summary within 2% of torch's FLOP counter with the encoding's cost
    on self-attention, none on cross-attention (it reads no positions), and no encoding at all."""
    import torch

    from anyformer import build_model
    from tests.helpers import flops_against_counter

    cfg = ModelConfig(arch=arch, vocab_size=24, dim=8, num_layers=2, max_seq_len=256, ffn={"hidden_dim": 8},
                      attention={"num_heads": 2, "kernel": "eager"}, positional={"kind": positional})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ours, measured = flops_against_counter(model, model.example_inputs(1, torch.Generator().manual_seed(0), 256), 256, steps=4)
    assert abs(ours - measured) <= 0.02 * measured, (ours, measured)
