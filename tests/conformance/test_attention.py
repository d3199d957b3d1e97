"""The contract of every registered attention kind, tested by being registered: it builds in a
decoder (and in an encoder, or refuses one with a clear error); a few training steps on a fixed
batch lower the loss; greedy decoding with its cache equals recomputing the whole sequence; its
weights survive the checkpoint round trip; and the FLOPs it declares (nn/attention/cost.py)
match torch's FLOP counter on its pure-torch form (the eager kernel; sparse kinds through
their dense reference), in an encoder, where that count is exact."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from anyformer import ConfigError, ModelConfig, build_model
from anyformer.generation import generate
from anyformer.models.summary import summarize
from anyformer.nn.attention import ATTENTIONS
from anyformer.training.checkpoint import load_weights, save_checkpoint

from ..helpers import (
    assert_reordered_cache_continues, assert_storing_weights_changes_nothing, fit_losses, flops_against_counter, greedy_by_recompute, orders_itself,
)

# the package's own kinds (tests register others into the same registry)
KINDS = [name for name in ATTENTIONS.names() if ATTENTIONS.get(name).__module__.startswith("anyformer.")]
SPARSE_OPTIONS = {"sliding_window": {"window": 6}, "dilated": {"window": 6}, "lambda_shaped": {"window": 6}, "block_local": {"block": 8},
                  "strided": {"stride": 4}, "fixed": {"stride": 4, "num_summary": 1}}


def config(kind: str, arch: str = "decoder", **attention: object) -> ModelConfig:
    options = dict(SPARSE_OPTIONS.get(kind, {}), **attention.pop("options", {}))  # type: ignore[arg-type]
    positional = {"kind": "none"} if orders_itself(kind) else {}
    return ModelConfig(arch=arch, vocab_size=24, dim=32, num_layers=2, max_seq_len=48, ffn={"hidden_dim": 48}, positional=positional,
                       attention={"kind": kind, "num_heads": 4, "options": options, **attention},
                       head={"kind": "mlm"} if arch == "encoder" else {})


def built(kind: str, arch: str = "decoder", **attention: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(config(kind, arch, **attention))


def test_every_kind_is_covered() -> None:
    assert {"mha", "linear", "performer", "sliding_window", "differential", "selective"} <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_builds_in_a_decoder_and_an_encoder_or_says_why_not(kind: str) -> None:
    built(kind)
    try:
        built(kind, "encoder")
    except (ConfigError, ValueError) as e:  # a causal-only kind: the message names what to use instead
        assert "causal" in str(e) and "decoder" in str(e), str(e)


@pytest.mark.parametrize("kind", KINDS)
def test_training_steps_lower_the_loss(kind: str) -> None:
    model = built(kind)
    losses = fit_losses(model)
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("kind", KINDS)
def test_cached_greedy_decoding_equals_recompute(kind: str) -> None:
    model = built(kind).eval()
    prompt = [3, 1, 4, 1, 5, 9, 2]
    ours = generate(model, [prompt], max_new_tokens=14)[0].tolist()
    assert ours == greedy_by_recompute(model, prompt, 14)


@pytest.mark.parametrize("kind", KINDS)
def test_reordering_the_cache_as_a_beam_step_does_continues_the_reordered_rows(kind: str) -> None:
    """Three rows decoded through the cache, the cache's rows reordered to (2, 0, 0) as beam
    search does, then the rest: the logits equal the full forward of the rows in that order
    (every layer's cache or state, and the model's, follows the rows)."""
    tokens = torch.randint(0, 24, (3, 20), generator=torch.Generator().manual_seed(0))
    assert_reordered_cache_continues(built(kind).eval(), tokens, torch.tensor([2, 0, 0]), (5, 11))


@pytest.mark.parametrize("kind", KINDS)
def test_weights_round_trip_through_a_checkpoint(kind: str, tmp_path) -> None:
    model = built(kind).eval()
    folder = save_checkpoint(tmp_path, 1, model, None, {}, {"step": 1})
    torch.manual_seed(123)  # a different initialisation, replaced by the saved weights
    again = build_model(config(kind)).eval()
    load_weights(again, folder)
    tokens = torch.randint(0, 24, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))


@pytest.mark.parametrize("kind", KINDS)
def test_declared_flops_match_the_flop_counter(kind: str) -> None:
    n = 48
    extra = {"options": {"dense": True}} if kind in SPARSE_OPTIONS else {}
    try:
        model = built(kind, "encoder", kernel="eager", **extra).eval()
    except (ConfigError, ValueError):
        pytest.skip(f"{kind} is causal-only: under a causal mask the eager kernel computes the whole score matrix, "
                    "while the summary counts the causal half (Kaplan et al.)")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 24, (1, n)))
    measured = counter.get_total_flops() / n
    ours = summarize(model, seq_len=n).flops_per_token_forward
    assert 0.9 * measured <= ours <= 1.1 * measured, (ours, measured)


def bench_spec(method: str, mode: str, positional: str = "none") -> dict:
    return dict(method=method, mode=mode, n=32, causal=True, backward=True, positional=positional, num_heads=2, head_dim=8,
                window=8, dtype="float32", device="cpu", threads=1, min_time=0.0, repeats=1)


@pytest.mark.parametrize("kind", KINDS)
def test_bench_attention_times_it(kind: str) -> None:
    """`anyformer bench attention` runs the kind, forward and backward, as the mode it declares
    (kernel or whole module), and as a whole module when asked."""
    from anyformer.bench.attention import all_methods
    from anyformer.bench.attention_run import measure

    method = "mha[sdpa]" if kind == "mha" else kind
    mixer = next(m for m in built(kind).modules() if hasattr(m, "build_context"))
    declared = getattr(mixer, "bench_mode", "module")
    for mode in ("kernel", "module"):
        if method not in all_methods(mode):
            assert mode == "kernel", f"{method} missing from module-mode bench methods"
            continue
        result = measure(bench_spec(method, mode))
        assert result["time_s"] > 0 and result["runs"] == 2, result
        assert result["mode"] == ("module" if mode == "module" or declared == "module" else "kernel"), (mode, declared, result)


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_attention_gets_causal_maps_or_says_why_not(kind: str, tmp_path) -> None:
    """What `anyformer inspect attention` does: one finite (heads, n, n) map per layer in which
    no query weighs a later key (softmax kinds: rows sum to 1; differential and linear attention
    hand over weights that need not), per-head statistics, the PNG grid; a kind that never
    forms its weights says so."""
    from anyformer.training.inspect import attention_maps, head_statistics, plot_attention_grid

    model = built(kind)
    try:
        maps = attention_maps(model, torch.randint(0, 24, (1, 12), generator=torch.Generator().manual_seed(0)))
    except ValueError as e:
        assert "never forms its attention weights" in str(e), str(e)
        return
    assert len(maps) == 2
    for w in maps:
        assert w.shape[1:] == (12, 12) and 1 <= w.shape[0] <= 4 and bool(w.isfinite().all())  # differential: pairs of heads
        assert float(w.triu(1).abs().max()) == 0.0
    entropy, distance = head_statistics(maps)
    assert entropy.shape == distance.shape == (2, maps[0].shape[0]) and bool(entropy.isfinite().all())
    assert plot_attention_grid(maps, tmp_path / "maps.png").stat().st_size > 0


@pytest.mark.parametrize("kind", KINDS)
def test_storing_the_weights_leaves_the_outputs_unchanged(kind: str) -> None:
    assert_storing_weights_changes_nothing(built(kind), torch.randint(0, 24, (2, 20), generator=torch.Generator().manual_seed(3)))



@pytest.mark.parametrize("kind", KINDS)
def test_declared_decoding_cost_matches_the_flop_counter_where_mixing_dominates(kind: str) -> None:
    """The summary's cost of the decoding step at position 319 in narrow layers (width 8), where
    a softmax kind's scores over the cache are most of it (at the default width the mixing is
    a fraction, and 10% hides a wrong count of keys): within 2% of torch's FLOP counter, on
    the eager kernel (sparse kinds through their dense reference: the chunked kernel's fused
    loop is invisible to the counter). The counter sees matrix products only, so the
    one-dimensional weights (norm gains, token-shift and decay vectors), which the summary
    counts at 2 FLOPs each like every weight, are taken off the summary's figure."""
    if kind == "rwkv4":
        pytest.skip("rwkv4's WKV recurrence is elementwise work only: the FLOP counter sees none of its mixing")
    n = 320
    extra = {"options": {"dense": True}} if kind in SPARSE_OPTIONS else {}
    cfg = config(kind, kernel="eager", num_heads=2, **extra)
    cfg.dim, cfg.max_seq_len, cfg.ffn.hidden_dim = 8, n, 8
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ours, measured = flops_against_counter(model, (torch.randint(0, 24, (1, n)),), n, steps=1)
    vectors = sum(p.numel() for p in model.parameters() if p.numel() == max(p.shape, default=1))
    assert abs(ours - 2 * vectors - measured) <= 0.02 * measured, (ours, vectors, measured)
