"""Pointer-generator encoder-decoder (model.arch pointer_generator): the output distribution
against the mixture written out with loops, probabilities that sum to one, no copy mass from
padding, cached greedy decoding equal to recomputation, and the configuration errors."""

from __future__ import annotations

import pytest
import torch

from anyformer.config import ConfigError
from anyformer.generation import generate

from .helpers import build


def _model(seed: int = 0) -> torch.nn.Module:
    model = build("pointer_generator", seed=seed)
    with torch.no_grad():  # a gate away from 0 and 1, so both parts of the mixture matter
        model.gate.weight.normal_(0, 0.3)
    return model


def _naive(model, src: torch.Tensor, tgt: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """log p from the paper's formula, one target position and one source position at a time."""
    memory = model.encode(src, keep)
    h = model.decode_hidden(tgt, memory, keep)
    b, n, d = h.shape
    V = model.config.vocab_size
    out = torch.empty(b, n, V, dtype=torch.float64)
    for i in range(b):
        for t in range(n):
            hv = h[i, t].double()
            p_vocab = torch.softmax(model.lm_head.proj.weight.double() @ hv, -1)
            q = model.copy_query.weight.double() @ hv
            scores = {j: float(q @ (model.copy_key.weight.double() @ memory[i, j].double())) / d**0.5
                      for j in range(src.shape[1]) if keep[i, j]}
            z = sum(torch.exp(torch.tensor(v)) for v in scores.values())
            p_copy = torch.zeros(V, dtype=torch.float64)
            for j, v in scores.items():
                p_copy[src[i, j]] += torch.exp(torch.tensor(v)) / z
            g = torch.sigmoid(model.gate.weight.double() @ hv + model.gate.bias.double())
            out[i, t] = torch.log(g * p_vocab + (1 - g) * p_copy)
    return out


def test_output_is_the_mixture_of_the_paper_and_sums_to_one() -> None:
    model = _model()
    torch.manual_seed(1)
    src = torch.randint(1, 97, (2, 7))
    keep = torch.ones_like(src, dtype=torch.bool)
    keep[1, 5:] = False  # a padded row
    tgt = torch.randint(1, 97, (2, 5))
    with torch.no_grad():
        got = model(src, tgt, keep)
        want = _naive(model, src, tgt, keep)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(2, 5), atol=1e-5, rtol=0)


def test_with_the_gate_closed_only_unpadded_source_tokens_have_probability() -> None:
    model = _model()
    with torch.no_grad():
        model.gate.weight.zero_()
        model.gate.bias.fill_(-60.0)  # g ~ 1e-26: the copy distribution alone
    src = torch.tensor([[5, 6, 7, 8, 9]])
    keep = torch.tensor([[True, True, True, False, False]])  # 8 and 9 are padding
    with torch.no_grad():
        p = model(src, torch.tensor([[1, 2, 3]]), keep).exp()
    assert torch.allclose(p[..., [5, 6, 7]].sum(-1), torch.ones(1, 3), atol=1e-5)
    assert float(p[..., 8].max()) < 1e-20 and float(p[..., 9].max()) < 1e-20


def test_cached_greedy_decoding_equals_recomputation() -> None:
    model = _model(seed=3)
    torch.manual_seed(2)
    src = torch.randint(1, 97, (2, 9))
    out = generate(model, src, max_new_tokens=6, decoder_start_token_id=1)  # (2, 1 + 6)
    keep = torch.ones_like(src, dtype=torch.bool)
    tgt = torch.ones(2, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(6):
            tgt = torch.cat([tgt, model(src, tgt, keep)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, tgt)
    beams = generate(model, src, max_new_tokens=6, decoder_start_token_id=1, num_beams=3)
    assert beams.shape[0] == 2 and bool((beams[:, 0] == 1).all())


def test_separate_embeddings_are_refused() -> None:
    with pytest.raises(ConfigError, match="share_embeddings=true"):
        build("pointer_generator", share_embeddings=False)
