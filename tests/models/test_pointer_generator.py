"""Pointer-generator encoder-decoder (model.arch pointer_generator): the output distribution
against the mixture written out with loops (match, gate and follow terms included),
probabilities that sum to one, label scores equal to the full distribution at the labels, bf16
autocast, no copy mass from padding, cached greedy decoding equal to recomputation, a copy
driven by the match and follow terms alone reproduces the memory, and the configuration errors."""

from __future__ import annotations

import pytest
import torch

from anyformer.config import ConfigError
from anyformer.generation import generate

from tests.helpers import build


def _model(seed: int = 0) -> torch.nn.Module:
    model = build("pointer_generator", seed=seed)
    with torch.no_grad():  # a gate away from 0 and 1, so both parts of the mixture matter
        model.gate.weight.normal_(0, 0.3)
    return model


def _naive(model, src: torch.Tensor, tgt: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """log p from the formula, one target position and one source position at a time: the
    paper's copy scores plus w_k for each k whose last k decoder inputs equal the k source tokens
    before the copied position, plus f times the previous position's copy attention one source
    position back; the gate adds u_k for each k matched somewhere."""
    memory = model.encode(src, keep)
    h = model.decode_hidden(tgt, memory, keep)
    b, n, d = h.shape
    V = model.config.vocab_size
    w, u, f = model.match_weights.double(), model.match_gate.double(), float(model.follow)
    out = torch.empty(b, n, V, dtype=torch.float64)
    for i in range(b):
        previous: dict[int, float] = {}  # the copy attention of position t - 1
        for t in range(n):
            hv = h[i, t].double()
            p_vocab = torch.softmax(model.lm_head.proj.weight.double() @ hv, -1)
            q = model.copy_query.weight.double() @ hv
            scores, found = {}, set()
            for j in range(src.shape[1]):
                if not keep[i, j]:
                    continue
                v = float(q @ (model.copy_key.weight.double() @ memory[i, j].double())) / d**0.5
                for k in range(1, len(w) + 1):
                    if all(t - m >= 0 and j - 1 - m >= 0 and tgt[i, t - m] == src[i, j - 1 - m] for m in range(k)):
                        v += float(w[k - 1])
                        found.add(k)
                v += f * previous.get(j - 1, 0.0)  # follow: one on from where the last position copied
                scores[j] = v
            z = sum(torch.exp(torch.tensor(v)) for v in scores.values())
            p_copy = torch.zeros(V, dtype=torch.float64)
            for j, v in scores.items():
                p_copy[src[i, j]] += torch.exp(torch.tensor(v)) / z
            previous = {j: float(torch.exp(torch.tensor(v)) / z) for j, v in scores.items()}
            g = torch.sigmoid(model.gate.weight.double() @ hv + model.gate.bias.double() + sum(float(u[k - 1]) for k in found))
            out[i, t] = torch.log(g * p_vocab + (1 - g) * p_copy)
    return out


def test_output_is_the_mixture_of_the_paper_and_sums_to_one() -> None:
    model = _model()
    with torch.no_grad():
        model.match_weights.copy_(torch.tensor([1.5, -0.7, 2.5]))
        model.match_gate.copy_(torch.tensor([0.4, -1.1, 0.9]))
        model.follow.fill_(3.5)
    torch.manual_seed(1)
    src = torch.randint(1, 4, (2, 9))  # three distinct ids: many 1-, 2- and 3-token matches
    keep = torch.ones_like(src, dtype=torch.bool)
    keep[1, 6:] = False  # a padded row
    tgt = torch.randint(1, 4, (2, 7))
    with torch.no_grad():
        found = model.matches(torch.cat([torch.full((2, 2), -1), tgt], 1), src)
        assert all(bool(found[1, :, :6, k].any()) for k in range(3))  # some 1-, 2- and 3-token matches on real source tokens
        assert bool(found[1, :, 6:].any())  # and some on padding, which must not count
        got = model(src, tgt, keep)
        want = _naive(model, src, tgt, keep)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(2, 7), atol=1e-5, rtol=0)


def test_label_scores_are_the_full_distribution_at_the_labels() -> None:
    """forward(..., labels=y), which training uses to skip the (b, n, V) mixture, gives the full
    distribution's log p at y (0 where y is ignored), with gradients equal to the full path's."""
    model = _model(seed=5)
    torch.manual_seed(3)
    src = torch.randint(1, 6, (3, 10))
    keep = torch.ones_like(src, dtype=torch.bool)
    keep[2, 7:] = False
    tgt = torch.randint(1, 6, (3, 6))
    labels = torch.randint(1, 97, (3, 6))
    labels[:, :3] = src[:, 4:7]  # labels that the copy distribution also holds
    labels[1, 4:] = -100
    labels[2, 5] = 0  # the first id of the vocabulary is a label like any other
    full = model(src, tgt, keep)
    got = model(src, tgt, keep, labels=labels)
    counted = labels != -100
    want = full.gather(-1, labels.clamp_min(0)[..., None])[..., 0].where(counted, torch.zeros(()))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert bool((got[~counted] == 0).all())
    grads = []
    for value in (got.sum(), want.sum()):
        model.zero_grad()
        value.backward(retain_graph=True)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_bf16_autocast_runs_the_mixture_in_fp32() -> None:
    """Training with train.dtype=bfloat16 autocasts the model: the vocabulary product runs in
    bf16, the mixture in fp32, so the distribution still sums to one, the label scores equal it
    at the labels, and it stays near the fp32 model's."""
    model = _model(seed=6)
    torch.manual_seed(4)
    src, tgt = torch.randint(1, 6, (2, 8)), torch.randint(1, 6, (2, 5))
    labels = torch.randint(1, 97, (2, 5))
    keep = torch.ones_like(src, dtype=torch.bool)
    with torch.no_grad():
        fp32 = model(src, tgt, keep)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = model(src, tgt, keep)
            picked = model(src, tgt, keep, labels=labels)
    assert full.dtype == torch.float32 and picked.dtype == torch.float32
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(picked, full.gather(-1, labels[..., None])[..., 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.exp(), fp32.exp(), atol=2e-2, rtol=0)


def test_with_the_gate_closed_only_unpadded_source_tokens_have_probability() -> None:
    model = _model()
    with torch.no_grad():
        model.gate.weight.zero_()
        model.gate.bias.fill_(-60.0)  # g ~ 1e-26: the copy distribution alone
        model.match_gate.zero_()
    src = torch.tensor([[5, 6, 7, 8, 9]])
    keep = torch.tensor([[True, True, True, False, False]])  # 8 and 9 are padding
    with torch.no_grad():
        p = model(src, torch.tensor([[1, 2, 3]]), keep).exp()
    assert torch.allclose(p[..., [5, 6, 7]].sum(-1), torch.ones(1, 3), atol=1e-5)
    assert float(p[..., 8].max()) < 1e-20 and float(p[..., 9].max()) < 1e-20


def test_cached_greedy_decoding_equals_recomputation() -> None:
    model = _model(seed=3)
    torch.manual_seed(2)
    src = torch.randint(1, 8, (2, 9))  # few distinct ids, so the match bonuses (which need the past inputs) take part
    out = generate(model, src, max_new_tokens=6, decoder_start_token_id=1)  # (2, 1 + 6)
    keep = torch.ones_like(src, dtype=torch.bool)
    tgt = torch.ones(2, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(6):
            tgt = torch.cat([tgt, model(src, tgt, keep)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, tgt)
    beams = generate(model, src, max_new_tokens=6, decoder_start_token_id=1, num_beams=3)
    assert beams.shape[0] == 2 and bool((beams[:, 0] == 1).all())


def test_a_prefill_asked_for_its_last_position_only_gives_the_full_forwards_last() -> None:
    """decode_step over a 5-token prefill with `last_only`: the (b, 1, V) log-probabilities of
    the full forward's last position (gate, copy attention and mixture all cut to that row)."""
    model = _model(seed=4).eval()
    src, tgt = torch.randint(1, 8, (2, 9), generator=torch.Generator().manual_seed(5)), torch.randint(1, 8, (2, 5))
    keep = torch.ones_like(src, dtype=torch.bool)
    with torch.no_grad():
        source = model.encode_source(src, keep)
        cache = model.make_cache(2)
        got = model.decode_step(tgt, cache, torch.arange(5).expand(2, 5), source=source, last_only=True)
        want = model(src, tgt, keep)[:, -1:]
    assert got.shape == (2, 1, want.shape[-1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory", [[40, 41, 42, 41, 43, 44], [40, 41, 42, 43, 44, 50, 41, 42, 43, 45, 46]])
def test_match_and_follow_terms_alone_copy_the_memory_that_follows_the_start_token(memory) -> None:
    """With the gate closed, the learned copy scores zeroed and large match and follow weights,
    the model copies: the start token matches the memory's start token, each next input matches
    the token before the next memory position, so greedy and beam decoding write the memory out,
    its end token included. Where a token repeats, the longer match decides; where a whole span
    repeats (41 42 43, then 44 once and 45 the other time), only the follow term knows which
    occurrence is being copied."""
    model = _model(seed=4)
    with torch.no_grad():
        model.gate.weight.zero_()
        model.gate.bias.fill_(-60.0)
        model.copy_query.weight.zero_()
        model.match_weights.fill_(20.0)
        model.match_gate.zero_()
        model.follow.fill_(20.0)
    bos, eos = 1, 2
    src = torch.tensor([[50, 51, 52, 53, bos, *memory, eos]])
    want = [bos, *memory, eos]
    greedy = generate(model, src, max_new_tokens=len(memory) + 1, decoder_start_token_id=bos, stop_tokens=[eos])
    assert greedy[0].tolist() == want
    beams = generate(model, src, max_new_tokens=len(memory) + 3, decoder_start_token_id=bos, stop_tokens=[eos], num_beams=3,
                     pad_token_id=0)
    assert beams[0].tolist() == want
    with torch.no_grad():  # teacher-forced, the same: the copy puts nearly all its mass on the next memory token
        p = model(src, torch.tensor([want[:-1]]), torch.ones_like(src, dtype=torch.bool)).exp()
    assert float(p[0, torch.arange(len(want) - 1), torch.tensor(want[1:])].min()) > 0.99


def test_separate_embeddings_are_refused() -> None:
    with pytest.raises(ConfigError, match="share_embeddings=true"):
        build("pointer_generator", share_embeddings=False)


def _with_and_without_copying(n: int):  # type: ignore[no-untyped-def]
    """A narrow pointer-generator over `n` tokens and the same-shaped encoder-decoder, eager
    attention (the one torch's FLOP counter sees), as (arch, model) pairs."""
    import dataclasses

    from anyformer import build_model

    from tests.helpers import tiny_config

    for arch in ("pointer_generator", "encoder_decoder"):
        cfg = tiny_config("pointer_generator", dim=16, max_seq_len=n, attention__kernel="eager")
        cfg = dataclasses.replace(cfg, arch=arch, options={} if arch == "encoder_decoder" else cfg.options)
        torch.manual_seed(0)
        yield arch, build_model(cfg).eval()


def test_the_copy_attentions_flops_are_what_the_counter_adds_to_the_encoder_decoders() -> None:
    """The summary's forward FLOPs of a pointer-generator less those of the same-shaped
    encoder-decoder (the copy attention's projections, scores and gate) equal what torch's FLOP
    counter measures between the two forwards, on a long source through narrow layers where the
    copy scores are most of that difference (the shared causal self-attention, which the counter
    and the summary count differently, cancels)."""
    from torch.utils.flop_counter import FlopCounterMode

    from anyformer.models.summary import summarize

    n = 256
    measured, stated = {}, {}
    for arch, model in _with_and_without_copying(n):
        x = model.example_inputs(1, torch.Generator().manual_seed(0), n)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*x)
        measured[arch], stated[arch] = counter.get_total_flops() / n, summarize(model, seq_len=n).flops_per_token_forward
    want = measured["pointer_generator"] - measured["encoder_decoder"]
    assert want > 2 * n * 16  # the scores over the source are in it
    assert abs((stated["pointer_generator"] - stated["encoder_decoder"]) - want) <= 0.03 * want, (stated, measured)


def test_a_decoding_steps_copy_scores_are_what_the_counter_adds_to_the_encoder_decoders() -> None:
    """The same difference for one decoding step over a 256-token source: the copy query, gate
    and scores against the source's copy keys (computed once per source, not per step), within 1%."""
    from tests.helpers import flops_against_counter

    n = 256
    measured, stated = {}, {}
    for arch, model in _with_and_without_copying(n):
        stated[arch], measured[arch] = flops_against_counter(model, model.example_inputs(1, torch.Generator().manual_seed(0), n), n, steps=4)
    want = measured["pointer_generator"] - measured["encoder_decoder"]
    assert want > 2 * n * 16  # the scores over the source are in it
    assert abs((stated["pointer_generator"] - stated["encoder_decoder"]) - want) <= 0.01 * want, (stated, measured)
