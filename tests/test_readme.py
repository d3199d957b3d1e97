"""The README's Python examples run as written: every ```python block, in order, in one fresh
interpreter, in a folder where `runs/shakespeare-char` is a (tiny) finished training run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from anyformer.training import Trainer
from tests.training_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_readme_python_examples_run_as_written(tmp_path: Path) -> None:
    blocks = python_blocks()
    assert len(blocks) >= 4
    cfg = tiny_config(tmp_path, "--model.max_seq_len=64", "--train.seq_len=64")
    Trainer(cfg, run_dir=tmp_path / "runs" / "shakespeare-char", verbose=False).fit()
    script = tmp_path / "readme_examples.py"
    script.write_text("\n\n".join(blocks))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the README states SmolLM2-135M-Instruct's greedy answer to "Hi!"
    assert "Hello! How can I assist you today?" in proc.stdout, proc.stdout[-2000:]
