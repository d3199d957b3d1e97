"""Masked-diffusion language modelling: the loss against the bound's formula written out, the
bound of a uniform model, stratified masking rates, the unmasking orders against naive loops,
draft editing, infilling that never touches the context, exact resume, commands and errors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from anyformer.config import ConfigError
from anyformer.generation.diffusion import DiffusionConfig, diffusion_fill, diffusion_generate
from anyformer.tasks.masked_diffusion import RATE_SCALE, DiffusionSampler, diffusion_loss
from anyformer.training import Trainer
from tests.training_helpers import interrupted_copy, tiny_config


def diffusion_config(tmp: Path, *extra: str):
    return tiny_config(tmp, "--task.kind=masked_diffusion", "--model.arch=encoder", "--model.head.kind=mlm",
                       "--task.options.eval_rates=2", "--task.options.sample_steps=4", *extra)


class Uniform(nn.Module):
    """Equal logits for every token."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.w = vocab, nn.Parameter(torch.zeros(()))

    def forward(self, tokens, attention_mask=None):
        return torch.zeros(*tokens.shape, self.vocab) + self.w


class Table(nn.Module):
    """Fixed logits per (position, token seen): deterministic and context-dependent through the
    number of masks, so the unmasking rules have something to rank."""

    def __init__(self, vocab: int, n: int, mask_id: int, seed: int = 0, sharpen: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(n, vocab, vocab, generator=g))
        self.mask_id, self.sharpen = mask_id, sharpen

    def forward(self, tokens, attention_mask=None):
        b, n = tokens.shape
        neighbour = torch.roll(tokens, 1, dims=1)  # each position sees the token on its left (wrapping)
        logits = self.table[torch.arange(n)[None].expand(b, n), neighbour]  # (b, n, V)
        if self.sharpen:  # more confident as fewer positions are masked
            seen = (tokens != self.mask_id).float().mean(-1, keepdim=True)[..., None]
            logits = logits * (0.2 + 5 * seen)
        return logits


def test_loss_equals_the_bound_written_out() -> None:
    g = torch.Generator().manual_seed(0)
    b, n, v, mask = 3, 7, 6, 5
    logits = torch.randn(b, n, v, generator=g)
    targets = torch.randint(0, mask, (b, n), generator=g)
    inputs = torch.where(torch.rand(b, n, generator=g) < 0.5, torch.full_like(targets, mask), targets)
    rates = torch.tensor([0.3, 0.5, 0.9])
    expected = 0.0
    for i in range(b):
        total = 0.0
        for j in range(n):
            if inputs[i, j] == mask:
                row = logits[i, j, :mask]  # the mask id is never a prediction
                total += -(float(row[targets[i, j]]) - math.log(sum(math.exp(float(x)) for x in row)))
        expected += total / float(rates[i]) / n
    assert float(diffusion_loss(logits, inputs, targets, rates, mask)) == pytest.approx(expected / b, rel=1e-5)


def test_rates_are_stratified_and_masks_follow_them() -> None:
    tokens = (torch.arange(5000) % 7).numpy().astype("uint16")
    s = DiffusionSampler(tokens, 400, 7, 1e-3, seed=1)
    rows = s.draw(8)
    rates = sorted(s.rate(int(c)) for c in rows[:, 2])
    for k, r in enumerate(rates):  # one rate in each eighth of [eps, 1]
        assert 1e-3 + (1 - 1e-3) * k / 8 <= r <= 1e-3 + (1 - 1e-3) * (k + 1) / 8
    inputs, targets, rate = s.batch(rows)
    assert torch.equal(torch.where(inputs == 7, targets, inputs), targets)  # only masks differ from the text
    share = (inputs == 7).float().mean(-1)
    assert torch.allclose(share, rate, atol=0.1)  # 400 positions per window
    state = s.state()
    again = s.draw(4)
    s.set_state(state)
    assert torch.equal(s.draw(4), again)


def test_a_uniform_model_is_bounded_by_log_vocabulary(tmp_path) -> None:
    """E_t[(1/t) E(#masked)] = n: the bound of a uniform model is log(V - 1) per token, whatever
    the rates drawn (up to the Monte-Carlo error of the masks)."""
    trainer = Trainer(diffusion_config(tmp_path, "--train.eval_batches=8", "--task.options.eval_rates=8"), run_dir=tmp_path / "r",
                      verbose=False)
    vocab = trainer.cfg.model.vocab_size
    scores = trainer.task.evaluate(Uniform(vocab), trainer.data, trainer.env)
    assert scores["val_loss"] == pytest.approx(math.log(vocab - 1), rel=0.03)
    assert scores["bits_per_token"] == pytest.approx(scores["val_loss"] / math.log(2))


@pytest.mark.parametrize("order", ["left_to_right", "confidence"])
def test_one_step_per_token_follows_the_documented_order(order) -> None:
    v, n, mask = 6, 9, 5
    model = Table(v, n, mask, seed=3)
    tokens = torch.tensor([[1, 2, 0, 0, 0, 0, 0, 4, 3]])
    fill = torch.zeros_like(tokens, dtype=torch.bool)
    fill[0, 2:7] = True
    got = diffusion_fill(model, tokens, fill, mask, DiffusionConfig(steps=5, temperature=0, order=order))
    x = torch.where(fill, torch.full_like(tokens, mask), tokens)
    for _ in range(5):  # the rule, one position per step
        with torch.no_grad():
            p = model(x)[0, :, :mask].softmax(-1)
        open_positions = [i for i in range(n) if x[0, i] == mask]
        i = open_positions[0] if order == "left_to_right" else max(open_positions, key=lambda j: float(p[j].max()))
        x[0, i] = int(p[i].argmax())
    assert torch.equal(got, x)


def test_schedule_edits_and_context_are_respected() -> None:
    v, n, mask = 8, 24, 7
    model = Table(v, n, mask, seed=5, sharpen=True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mask, (2, n), generator=g)
    fill = torch.zeros_like(tokens, dtype=torch.bool)
    fill[:, 6:18] = True
    drafted, edits, previous = [], 0, None

    def watch(step, x, masked, f):
        nonlocal edits, previous
        assert torch.equal(x[~fill], tokens[~fill])  # the context never changes
        assert torch.equal(x == mask, masked) and not bool((masked & ~fill).any())
        drafted.append((fill & ~masked).sum(-1).tolist())
        if previous is not None:
            edits += int((masked & ~previous).sum())
        previous = masked.clone()

    out = diffusion_fill(model, tokens, fill, mask, DiffusionConfig(steps=5, temperature=1.0, edit=True, seed=0), on_step=watch)
    assert drafted == [[12 * s // 5] * 2 for s in range(1, 6)]  # floor(L s / S) drafted after step s
    assert edits > 0  # early low-confidence drafts were masked again and redrawn
    assert torch.equal(out[~fill], tokens[~fill]) and not bool((out == mask).any())


def test_generate_in_blocks_keeps_the_prompt_and_fills_everything() -> None:
    v, n, mask = 6, 8, 5
    model = Table(v, n, mask, seed=1)
    new = diffusion_generate(model, [1, 2, 3], 11, mask, n, DiffusionConfig(steps=4, seed=0), block=4)
    assert len(new) == 11 and mask not in new


def test_bad_unmasking_options_are_named() -> None:
    model, tokens = Table(4, 5, 3), torch.zeros(1, 5, dtype=torch.long)
    fill = torch.ones_like(tokens, dtype=torch.bool)
    with pytest.raises(ValueError, match="steps=6 is more than the 5 positions"):
        diffusion_fill(model, tokens, fill, 3, DiffusionConfig(steps=6))
    with pytest.raises(ValueError, match="needs order 'confidence'"):
        diffusion_fill(model, tokens, fill, 3, DiffusionConfig(steps=2, order="random", edit=True))
    with pytest.raises(ValueError, match="same number of positions"):
        diffusion_fill(model, torch.zeros(2, 5, dtype=torch.long), torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]).bool(), 3,
                       DiffusionConfig(steps=1))


def test_trains_resumes_exactly_and_its_commands_work(tmp_path, capsys) -> None:
    from anyformer.cli import main

    cfg = diffusion_config(tmp_path)
    full = Trainer(cfg, run_dir=tmp_path / "full", verbose=False).fit()
    assert len(full.losses) == 8 and all(math.isfinite(x) for x in full.losses)
    resumed = Trainer(cfg, run_dir=interrupted_copy(tmp_path / "full", tmp_path / "part"), resume=True, verbose=False).fit()
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-6)

    run = str(tmp_path / "full")
    assert main(["infill", run, "ROMEO: ", " me.", "--length", "6", "--seed", "0", "--edit", "--mark"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("ROMEO: [[") and out.endswith("]] me.") and len(out) == len("ROMEO: [[") + 6 + len("]] me.")
    assert main(["generate", run, "--prompt", "KING", "--max-new-tokens", "40", "--steps", "8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("KING")
    # predict: the same fill as infill, gaps written [[N]]
    assert main(["predict", run, "ROMEO: [[6]] me.", "--set", "seed=0", "--set", "edit=true", "--set", "mark=true"]) == 0
    assert capsys.readouterr().out.strip() == out
    assert main(["predict", run, "KING", "--set", "length=10", "--set", "seed=0"]) == 0
    continued = capsys.readouterr().out.rstrip("\n")
    assert continued.startswith("KING") and len(continued) == 14
    for argv, message in [
        (["generate", run, "--top-p", "0.9"], r"--top-p \(nucleus sampling\) is not offered"),
        (["generate", run, "--max-new-tokens", "40", "--steps", "50"], "--steps 50 is more than the 16 tokens drafted together"),
        (["infill", run, "x" * 20, "y" * 10, "--length", "5"], "more than the model's context of 32"),
        (["infill", run, "a", "b", "--length", "4", "--order", "random", "--edit"], "--edit .* needs order 'confidence'"),
        (["predict", run, "a[[0]]b"], "a gap must hold at least 1 token"),
        (["predict", run, "x" * 20 + "[[5]]" + "y" * 10], "more than the model's context of 32"),
        (["predict", run, "a[[3]]b", "--set", "order=backwards"], "order must be one of confidence, random, left_to_right"),
        (["predict", run, "a[[3]]b", "--set", "steps=4"], "steps=4 is more than the 3 tokens drafted together"),
    ]:
        assert main(argv) == 2
        assert re.search(message, capsys.readouterr().err.replace("\n", " ")), argv


def test_decoder_runs_refuse_diffusion_options(tmp_path, capsys) -> None:
    from anyformer.cli import main

    Trainer(tiny_config(tmp_path, "--train.max_steps=2", "--train.eval_every=2"), run_dir=tmp_path / "lm", verbose=False).fit()
    assert main(["generate", str(tmp_path / "lm"), "--steps", "4", "--edit"]) == 2
    assert "--steps, --edit apply to masked-diffusion runs" in capsys.readouterr().err
    assert main(["infill", str(tmp_path / "lm"), "a", "b", "--length", "3"]) == 2
    assert "infill needs a masked_diffusion run" in capsys.readouterr().err


def test_bad_settings_are_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="task 'masked_diffusion' trains model.arch 'encoder'"):
        diffusion_config(tmp_path, "--model.arch=decoder").validate()
    with pytest.raises(ConfigError, match="task.options.eps"):
        Trainer(diffusion_config(tmp_path, "--task.options.eps=0"), run_dir=tmp_path / "r", verbose=False)
    with pytest.raises(ConfigError, match="sample_order"):
        Trainer(diffusion_config(tmp_path, "--task.options.sample_order=backwards"), run_dir=tmp_path / "r2", verbose=False)


def test_rate_code_round_trips() -> None:
    s = DiffusionSampler(torch.zeros(100, dtype=torch.int16).numpy(), 10, 1, 0.25, 0)
    assert s.rate(0) == 0.25 and s.rate(RATE_SCALE) == 1.0


def test_predict_fills_several_gaps_as_greedy_left_to_right_decoding(tmp_path, capsys) -> None:
    """With one token per step, order left_to_right and temperature 0, each step fills the
    leftmost masked position with its most likely token (the mask id excluded): the loop here."""
    from anyformer.cli import main
    from anyformer.training.run import load_run

    Trainer(diffusion_config(tmp_path), run_dir=tmp_path / "r", verbose=False).fit()
    r = load_run(tmp_path / "r", device="cpu")
    tok, mask = r.tokenizer, r.tokenizer.vocab_size
    texts, gaps = ["To ", ", or ", " be"], [3, 4]
    ids = tok.encode(texts[0]) + [mask] * gaps[0] + tok.encode(texts[1]) + [mask] * gaps[1] + tok.encode(texts[2])
    with torch.no_grad():
        while mask in ids:
            at = ids.index(mask)
            ids[at] = int(r.model(torch.tensor([ids]))[0, at, :mask].argmax())
    expected = tok.decode(ids)
    written = texts[0] + "".join(f"[[{n}]]{t}" for n, t in zip(gaps, texts[1:]))  # "To [[3]], or [[4]] be"
    argv = ["predict", str(tmp_path / "r"), written, "--set", "order=left_to_right", "--set", "temperature=0"]
    assert main(argv) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected
    assert main(argv + ["--set", "mark=true"]) == 0
    marked = capsys.readouterr().out.rstrip("\n")
    assert marked.startswith("To [[") and marked.count("[[") == 2 and marked.replace("[[", "").replace("]]", "") == expected


@pytest.mark.parametrize("length, steps", [(7, 3), (10, 4), (11, 6), (9, 2), (13, 13)])
@pytest.mark.parametrize("edit", [False, True])
def test_every_position_is_filled_when_the_steps_do_not_divide_the_length(length: int, steps: int, edit: bool) -> None:
    """After step s, floor(L * s / steps) positions per row are drafted (so each step drafts
    floor or ceil of L / steps); after the last, none is left masked, whether or not `steps`
    divides L, with and without edits."""
    v, mask = 6, 5
    model = Table(v, length + 2, mask, seed=1)
    tokens = torch.zeros(2, length + 2, dtype=torch.long)
    fill = torch.zeros_like(tokens, dtype=torch.bool)
    fill[:, 1:-1] = True
    drafted = []
    out = diffusion_fill(model, tokens, fill, mask, DiffusionConfig(steps=steps, temperature=1.0, edit=edit, seed=0),
                         on_step=lambda s, x, masked, f: drafted.append((f & ~masked).sum(-1).tolist()))
    assert drafted == [[length * s // steps] * 2 for s in range(1, steps + 1)]
    per_step = [b - a for a, b in zip([0] + [d[0] for d in drafted], [d[0] for d in drafted])]
    assert set(per_step) <= {length // steps, -(-length // steps)}
    assert not (out[fill] == mask).any() and torch.equal(out[~fill], tokens[~fill])
