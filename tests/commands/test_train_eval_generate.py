"""The train / eval / generate / info commands end to end, and their error messages."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from anyformer.cli import main
from anyformer.config import ConfigError, save_yaml, to_dict
from anyformer.training.config import RunConfig, default_run_config, load_run_config
from tests.helpers import REPO
from tests.training_helpers import tiny_config

CONFIGS = REPO / "configs"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tiny_config(tmp)
    save_yaml(cfg, tmp / "run.yaml")
    assert main(["train", str(tmp / "run.yaml"), "--train.max_steps=6", "--train.samples=1",
                 "--task.options.sample_tokens=20", "--out", str(tmp / "out")]) == 0
    return tmp / "out"


def test_train_writes_run_folder(run_dir: Path, capsys) -> None:
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (run_dir / name).is_file()
    cfg = load_run_config(run_dir / "config.yaml")
    assert cfg.train.max_steps == 6  # the override was applied and saved


def test_eval_reports_loss_perplexity_bpc(run_dir: Path, capsys) -> None:
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    loss = float(re.search(r"loss\s+([\d.]+)", out).group(1))
    ppl = float(re.search(r"perplexity\s+([\d.]+)", out).group(1))
    bpc = float(re.search(r"bits/char\s+([\d.]+)", out).group(1))
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)
    assert bpc == pytest.approx(loss / math.log(2), rel=1e-3)  # one character per token
    assert main(["eval", str(run_dir), "--task-option", "beams=1"]) == 2  # not one of the causal LM's task options
    assert "unknown config key 'task.options (causal_lm).beams'; valid keys here: sample_prompt" in capsys.readouterr().err


def test_generate_streams_continuation(run_dir: Path, capsys) -> None:
    assert main(["generate", str(run_dir), "--prompt", "MACBETH:", "--max-new-tokens", "15", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("MACBETH:") and out.endswith("\n") and len(out) - 1 == len("MACBETH:") + 15  # one newline after the text


def test_generate_greedy_equals_full_recompute(run_dir: Path, capsys) -> None:
    """The command decodes with the KV cache; greedy must match argmax over full recomputes."""
    import torch

    from anyformer.training.run import load_run

    r = load_run(run_dir)
    ids = r.tokenizer.encode("MACBETH:")
    tokens = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(12):
            tokens = torch.cat([tokens, r.model(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    expected = "MACBETH:" + r.tokenizer.decode(tokens[0, len(ids):].tolist())
    assert main(["generate", str(run_dir), "--prompt", "MACBETH:", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_runs_past_the_context(run_dir: Path, capsys) -> None:
    """A RoPE model keeps generating past max_seq_len (32 here) with the rolling cache."""
    assert main(["generate", str(run_dir), "--prompt", "MACBETH:", "--max-new-tokens", "80", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out) - 1 == len("MACBETH:") + 80


def test_generate_needs_exactly_one_source(run_dir: Path, capsys) -> None:
    assert main(["generate", "--prompt", "x"]) == 2
    assert "either a run folder" in capsys.readouterr().err
    assert main(["generate", str(run_dir), "--model", "x.gguf"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["generate", str(run_dir), "--chat"]) == 2
    assert "--chat" in capsys.readouterr().err


def test_generate_rejects_out_of_vocabulary_prompt(run_dir: Path, capsys) -> None:
    assert main(["generate", str(run_dir), "--prompt", "ROMEO: \u00e9\u4e2d"]) == 2
    err = capsys.readouterr().err
    assert "not in this character vocabulary" in err and "\u00e9" in err


def test_info_on_run_preset_and_config(run_dir: Path, capsys) -> None:
    assert main(["info", str(run_dir)]) == 0
    assert "parameters" in capsys.readouterr().out
    assert main(["info", "gpt2-small"]) == 0
    assert "124,439,808" in capsys.readouterr().out
    assert main(["info", str(CONFIGS / "shakespeare-char.yaml")]) == 0


def test_unknown_config_key_is_named(tmp_path, capsys) -> None:
    assert main(["train", "--train.lrr=1e-3"]) == 2
    assert "train.lrr" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("train:\n  learning_rate: 0.1\n")
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate" in err and "valid keys" in err
    with pytest.raises(ConfigError, match="model.dimm"):
        load_run_config(None, ["--model.dimm=3"])


def test_missing_files_are_reported(tmp_path, capsys) -> None:
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "no-run")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_corrupted_checkpoint_is_reported(run_dir: Path, tmp_path, capsys) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for w in (copy / "checkpoints").glob("step_*/model.safetensors"):
        w.write_bytes(w.read_bytes()[:100])
    assert main(["eval", str(copy)]) == 2
    assert "corrupted or truncated" in capsys.readouterr().err


def test_shipped_configs_load_and_default_matches_builtin() -> None:
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert {"shakespeare-char.yaml", "shakespeare-bpe.yaml", "shakespeare-char-large.yaml"} <= set(names)
    for name in names:
        load_run_config(CONFIGS / name).validate()
    assert to_dict(load_run_config(CONFIGS / "shakespeare-char.yaml")) == to_dict(default_run_config())
    assert isinstance(load_run_config(), RunConfig)


def test_resume_from_the_command_line(run_dir: Path, tmp_path) -> None:
    import json
    import shutil

    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    assert main(["train", "--resume", str(copy), "--train.max_steps=8", "--train.samples=0", "--quiet"]) == 0
    latest = json.loads((copy / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 8
    assert main(["train", "config.yaml", "--resume", str(copy)]) == 2  # a config and a run folder: ambiguous
