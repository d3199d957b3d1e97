"""Generation past the context with absolute positions: one sampler (the last max_seq_len
tokens recomputed per step) for the trainer's samples, `generate` and the window streams, equal
to greedy decoding written out over the cropped context; top-p and stop tokens honoured."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from anyformer.cli import main
from anyformer.generation import GenerationConfig, stream
from anyformer.generation.window import stream_window
from tests.helpers import build


def tiny(**overrides: object) -> torch.nn.Module:
    """A tiny decoder (rmsnorm asked for no bias explicitly, whatever NormConfig's default)."""
    return build(norm__bias=False, **overrides)


def naive_greedy(model: torch.nn.Module, ids: list[int], new: int, context: int) -> list[int]:
    """Greedy decoding written out: argmax over model(last `context` tokens), no cache."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(new):
            tokens = torch.cat([tokens, model(tokens[:, -context:])[:, -1].argmax(-1, keepdim=True)], 1)
    return tokens[0, len(ids):].tolist()


def test_window_greedy_equals_argmax_over_the_cropped_context() -> None:
    model = tiny(positional__kind="learned", max_seq_len=12)
    ids = [5, 9, 2, 7, 1]
    got = list(stream_window(model, ids, GenerationConfig(max_new_tokens=30), context=12))
    assert got == naive_greedy(model, ids, 30, 12)  # 35 tokens: 23 steps past the learned table's 12


@pytest.mark.parametrize("settings", [
    dict(top_p=0.8, temperature=1.3),
    dict(top_k=5, min_p=0.05, repetition_penalty=1.3),
])
def test_window_sampler_equals_the_cached_stream_when_nothing_is_cropped(settings: dict) -> None:
    model = tiny(positional__kind="rope")  # max_seq_len 64: prompt + new tokens fit
    ids = [3, 14, 15, 92, 65]
    config = GenerationConfig(max_new_tokens=20, do_sample=True, seed=7, **settings)
    cached = list(stream(model, ids, config))
    assert list(stream_window(model, ids, config)) == cached
    other_seed = list(stream_window(model, ids, config.with_overrides(seed=8)))
    assert other_seed != cached  # the seed is honoured, so the equality above is not vacuous


def test_window_stops_at_a_stop_token() -> None:
    model = tiny(positional__kind="learned", max_seq_len=12)
    ids = [5, 9, 2, 7, 1]
    free = naive_greedy(model, ids, 20, 12)
    stop = free[6]
    got = list(stream_window(model, ids, GenerationConfig(max_new_tokens=20, stop_tokens=[stop]), context=12))
    assert got == free[: free.index(stop) + 1]


def test_trainer_samples_past_the_context_use_the_window_sampler(learned_run: SimpleNamespace) -> None:
    trainer = learned_run.trainer
    tok = trainer.data.tokenizer
    ids = tok.encode("MACBETH:")
    trainer.model.eval()
    want = "MACBETH:" + tok.decode(naive_greedy(trainer.model, ids, 40, 32))  # 8 + 40 tokens > 32
    assert learned_run.result.samples == [want, want]
    # top_k=1 keeps only the most likely token: sampling at any temperature is then greedy
    trainer.task.options.temperature, trainer.task.options.top_k = 1.7, 1
    assert trainer.samples() == [want, want]


def test_generate_past_the_context_honours_top_p(learned_run: SimpleNamespace, capsys) -> None:
    from anyformer.training.run import load_run

    r = load_run(learned_run.dir)
    ids = r.tokenizer.encode("MACBETH:")
    want = "MACBETH:" + r.tokenizer.decode(naive_greedy(r.model, ids, 40, 32))
    # a tiny top-p keeps only the most likely token, so sampling at temperature 2 is greedy
    args = ["generate", str(learned_run.dir), "--prompt", "MACBETH:", "--max-new-tokens", "40", "--temperature", "2",
            "--top-p", "0.001", "--seed", "0"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert out.out == want + "\n" and "recomputing the last 32 tokens" in out.err
