"""`anyformer generate` and the sample settings of `train`: bad sampling options are refused
with one line, before any model is loaded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from anyformer.cli import main
from anyformer.config import ConfigError, apply_overrides
from anyformer.training.config import default_run_config


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "-1", "--temperature must be >= 0"),
    ("--top-p", "0", "--top-p must be in (0, 1]"),
    ("--top-p", "1.5", "--top-p must be in (0, 1]"),
    ("--top-k", "-2", "--top-k must be >= 0"),
    ("--max-new-tokens", "0", "--max-new-tokens must be >= 1"),
])
def test_generate_refuses_bad_sampling_options_before_loading(learned_run: SimpleNamespace, monkeypatch, capsys,
                                                              flag: str, value: str, message: str) -> None:
    import anyformer.pretrained.loading
    import anyformer.training.run

    def no_loading(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(anyformer.training.run, "load_run", no_loading)
    monkeypatch.setattr(anyformer.pretrained.loading, "load_pretrained", no_loading)
    for source in ([str(learned_run.dir)], ["--model", str(learned_run.dir / "missing.gguf")]):
        assert main(["generate", *source, "--prompt", "MACBETH:", flag, value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("anyformer generate: error: ") and message in err, err


def test_train_refuses_bad_sample_settings() -> None:
    for bad in ("--task.options.temperature=-1", "--task.options.top_k=-1", "--task.options.sample_tokens=0"):
        cfg = apply_overrides(default_run_config(), ["--train.samples=1", bad])
        with pytest.raises(ConfigError, match="task.options.sample_tokens must be >= 1"):
            cfg.validate()
    with pytest.raises(ConfigError, match=r"unknown config key 'task.options \(causal_lm\).sample_token'; valid keys here: sample_prompt"):
        apply_overrides(default_run_config(), ["--task.options.sample_token=5"]).validate()
