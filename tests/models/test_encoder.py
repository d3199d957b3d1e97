"""The encoder's pooling, read against the hidden states themselves: [CLS] pooling is the first
position's state, mean pooling the mean over the real (unmasked) positions; a pooled head's
output depends on exactly those positions."""

from __future__ import annotations

import torch

from anyformer.models.encoder import pool
from tests.helpers import build


def test_cls_pooling_is_the_first_position_and_mean_pooling_skips_padding() -> None:
    hidden = torch.randn(2, 5, 3)
    keep = torch.tensor([[True, True, True, False, False], [True] * 5])
    assert torch.equal(pool(hidden, keep, "cls"), hidden[:, 0])
    want = torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)])
    torch.testing.assert_close(pool(hidden, keep, "mean"), want)
    torch.testing.assert_close(pool(hidden, None, "mean"), hidden.mean(1))


def test_a_cls_pooled_classifier_reads_the_first_position_only() -> None:
    model = build("encoder", head__kind="sequence_classification", head__pooling="cls", head__num_labels=3)
    tokens = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        out = model(tokens)
        hidden = model.hidden(tokens)
        torch.testing.assert_close(out, model.head.classifier(model.head.pooler.dense(hidden[:, 0])))


def test_the_encoder_is_bidirectional() -> None:
    """A later token changes an earlier position's state (a causal encoder would not)."""
    model = build("encoder")
    tokens = torch.randint(0, 96, (1, 8))
    changed = tokens.clone()
    changed[0, -1] += 1
    with torch.no_grad():
        a, b = model.hidden(tokens), model.hidden(changed)
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-6)
