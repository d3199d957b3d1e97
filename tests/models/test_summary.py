"""The model summary's activation memory against the formula of Korthikanti et al. 2022 worked
out by hand: s b d (34 + 5 h s / d) bytes per layer at 16 bits, plus fp32 logits and their
gradient, over every layer of every stack."""

from __future__ import annotations

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
