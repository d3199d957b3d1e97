import os
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory) -> SimpleNamespace:
    """A tiny trained run with learned (absolute) positions and a context of 32 tokens."""
    from anyformer.training import Trainer

    from tests.training_helpers import tiny_config

    tmp = tmp_path_factory.mktemp("learned")
    cfg = tiny_config(tmp, "--model.positional.kind=learned", "--model.norm.bias=false", "--train.samples=2",
                      "--task.options.sample_tokens=40", "--task.options.temperature=0")
    cfg.task.options["sample_prompt"] = "MACBETH:"
    trainer = Trainer(cfg, run_dir=tmp / "run", verbose=False)
    result = trainer.fit()
    return SimpleNamespace(dir=tmp / "run", trainer=trainer, result=result)
