"""Protein masked language modelling: masking proportions, exact resume, metrics against an
independent computation, and clear errors for a task that does not fit the model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from anyformer.config import ConfigError, apply_overrides
from anyformer.data.proteins import ESM_TOKENS, ProteinTokenizer, packaged_proteins, read_fasta
from anyformer.data.split import held_out
from anyformer.tasks.masked_lm import ProteinSampler, mask_tokens
from anyformer.training import Trainer
from anyformer.training.config import default_run_config
from tests.training_helpers import check_ddp_matches_one_process, interrupted_copy


def mlm_config(tmp: Path, *extra: str):
    return apply_overrides(default_run_config(), [
        "--task.kind=masked_lm", "--data.corpus=proteins", "--data.val_fraction=0.1", "--model.arch=encoder",
        "--model.dim=32", "--model.num_layers=2", "--model.attention.num_heads=2", "--model.ffn.hidden_dim=64",
        "--model.max_seq_len=64", "--train.seq_len=64", "--train.batch_size=8", "--train.max_steps=8",
        "--train.max_minutes=null", "--train.warmup_steps=2", "--train.eval_every=4", "--train.eval_batches=2",
        "--train.log_every=2", "--train.dtype=float32", "--train.optimizer=adamw", "--train.samples=0",
        "--train.lr=3e-3", f"--train.out_dir={tmp / 'run'}", "--train.threads=1", *extra,
    ])


def test_fasta_and_split_are_what_the_file_holds() -> None:
    records = read_fasta(packaged_proteins())
    assert len(records) == 2100 and all("*" not in s for _, s in records)
    raw = [line.strip() for line in packaged_proteins().read_text().splitlines() if not line.startswith(">")]
    assert sum(len(line) for line in raw) == 682_583  # the residue count DATA.md gives (stops '*' included)
    assert sum(len(s) for _, s in records) == 682_583 - sum(line.count("*") for line in raw)  # the stops are dropped
    val = [n for n, _ in records if held_out(n, 0.1)]
    assert 150 < len(val) < 270  # about a tenth, chosen by id
    assert held_out(val[0], 0.1) and held_out(val[0], 0.5)  # a larger fraction keeps every earlier choice


def test_tokenizer_is_the_esm_alphabet() -> None:
    tok = ProteinTokenizer()
    assert tok.vocab_size == 33 and tok.tokens == ESM_TOKENS
    assert tok.encode("MK<mask>L") == [20, 15, 32, 4]
    assert tok.decode(tok.encode("MKTAYIAKQR")) == "MKTAYIAKQR"
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode("M<oops>K")


def test_masking_follows_the_80_10_10_rule_at_15_percent() -> None:
    tok = ProteinTokenizer()
    g = torch.Generator().manual_seed(0)
    n = 200_000
    tokens = torch.tensor(tok.standard_ids)[torch.randint(20, (n,), generator=g)]
    keep = torch.ones(n, dtype=torch.bool)
    keep[:10] = False  # special positions are never selected
    inputs, targets = mask_tokens(tokens, keep, tok, 0.15, g)
    selected = targets != -100
    assert not selected[:10].any()
    assert abs(selected.float().mean().item() - 0.15) < 0.005
    masked = (inputs == tok.mask_id) & selected
    unchanged = (inputs == tokens) & selected
    replaced = selected & ~masked & ~unchanged
    k = selected.sum().item()
    assert abs(masked.sum().item() / k - 0.8) < 0.01
    # a random replacement equals the original 1 time in 20: "unchanged" is 0.1 + 0.1 / 20
    assert abs(unchanged.sum().item() / k - (0.1 + 0.1 / 20)) < 0.01
    assert abs(replaced.sum().item() / k - 0.1 * 19 / 20) < 0.01
    assert torch.equal(targets[selected], tokens[selected])


def test_long_proteins_are_cropped_to_windows_with_cls_and_eos() -> None:
    tok = ProteinTokenizer()
    long = torch.tensor(tok.encode("ACDEFGHIKLMNPQRSTVWY" * 10))
    sampler = ProteinSampler([long], tok, 32, 0.15, seed=0)
    inputs, keep, targets = sampler.batch(sampler.draw(16))
    assert keep.all() and (inputs[:, 0] == tok.cls_id).all() and (inputs[:, -1] == tok.eos_id).all()
    originals = torch.where(targets != -100, targets, inputs)[:, 1:-1]
    text = "ACDEFGHIKLMNPQRSTVWY" * 10
    assert all(tok.decode(row.tolist()) in text for row in originals)  # contiguous windows of the protein


def test_masked_lm_trains_and_resumes_exactly(tmp_path) -> None:
    cfg = mlm_config(tmp_path)
    full = Trainer(cfg, run_dir=tmp_path / "full", verbose=False).fit()
    assert len(full.losses) == 8 and full.losses[-1] < full.losses[0]
    part = interrupted_copy(tmp_path / "full", tmp_path / "part")
    resumed = Trainer(cfg, run_dir=part, resume=True, verbose=False).fit()
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-6)
    evals = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    last = evals[-1]
    assert math.isclose(last["perplexity"], math.exp(last["val_loss"]), rel_tol=1e-9)
    assert 0 <= last["accuracy"] <= 1 and last["unigram_perplexity"] > 1


def test_evaluation_metrics_equal_a_direct_computation(tmp_path) -> None:
    cfg = mlm_config(tmp_path)
    trainer = Trainer(cfg, run_dir=tmp_path / "run", verbose=False)
    scores = trainer.task.evaluate(trainer.model, trainer.data, trainer.env, batches=2)
    # the same fixed examples, scored one position at a time
    from anyformer.tasks.masked_lm import EVAL_SEED

    sampler = ProteinSampler(trainer.data.val, trainer.data.tokenizer, 64, 0.15, EVAL_SEED)
    nll = base = correct = count = 0.0
    trainer.model.eval()
    with torch.no_grad():
        for _ in range(2):
            inputs, keep, targets = sampler.batch(sampler.draw(8))
            logits = trainer.model(inputs, keep)
            for b in range(targets.shape[0]):
                for i in range(targets.shape[1]):
                    y = int(targets[b, i])
                    if y == -100:
                        continue
                    logp = torch.log_softmax(logits[b, i].double(), -1)
                    nll -= float(logp[y])
                    base -= float(trainer.data.unigram[y])
                    correct += float(int(logits[b, i].argmax()) == y)
                    count += 1
    assert scores["val_loss"] == pytest.approx(nll / count, rel=1e-5)
    assert scores["unigram_loss"] == pytest.approx(base / count, rel=1e-5)
    assert scores["accuracy"] == pytest.approx(correct / count)


def test_task_and_architecture_mismatches_are_clear(tmp_path) -> None:
    with pytest.raises(ConfigError, match="task 'masked_lm' trains model.arch 'encoder'; this run has model.arch='decoder'"):
        mlm_config(tmp_path, "--model.arch=decoder").validate()
    with pytest.raises(ConfigError, match="task 'causal_lm' trains model.arch 'decoder'"):
        mlm_config(tmp_path, "--task.kind=causal_lm").validate()
    with pytest.raises(ConfigError, match="unknown task 'mlm'"):
        mlm_config(tmp_path, "--task.kind=mlm").validate()
    with pytest.raises(ConfigError, match="mask_prob"):
        Trainer(mlm_config(tmp_path, "--task.options.mask_prob=1.5"), run_dir=tmp_path / "r", verbose=False)


def test_eval_and_fill_mask_commands_use_the_task(tmp_path, capsys) -> None:
    from anyformer.cli import main

    Trainer(mlm_config(tmp_path), run_dir=tmp_path / "run", verbose=False).fit()
    assert main(["eval", str(tmp_path / "run"), "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "task masked_lm" in out and "unigram_perplexity" in out and "accuracy" in out
    assert main(["fill-mask", str(tmp_path / "run"), "MKT<mask>AYIAK<mask>R", "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("position    4:") and lines[1].startswith("position   10:")
    filled = lines[-1].split()[-1]
    assert len(filled) == 11 and filled[:3] == "MKT" and filled[4:9] == "AYIAK" and "<" not in filled
    assert main(["fill-mask", str(tmp_path / "run"), "MKTAYIAKQR"]) != 0
    assert "the sequence has no <mask>" in capsys.readouterr().err
    # a letter outside the vocabulary is named, not read as <unk> in silence; <unk> written out is fine
    assert main(["fill-mask", str(tmp_path / "run"), "MKT<mask>J1"]) == 2
    assert "'1J' are not residues of this vocabulary" in capsys.readouterr().err
    assert main(["fill-mask", str(tmp_path / "run"), "MKT<mask><unk>A"]) == 0


def test_two_process_ddp_matches_one_process(tmp_path) -> None:
    """Each process builds its share of the same draws (examples carry their own seeds), and
    the evaluation combines sums over processes: losses and metrics equal one process's."""
    cfg = mlm_config(tmp_path, "--train.max_steps=5", "--train.eval_every=5")
    check_ddp_matches_one_process(cfg, tmp_path, ("val_loss", "accuracy", "unigram_loss"))
