"""User variants from outside the package on every command (anyformer/plugins.py): the README's
"Extending" example through `--import` in train, generate, bench attention and compare (in
fresh processes, as a user runs them); ANYFORMER_PLUGINS and the entry-point group; a run that
records its plugins; clear errors for a plugin that cannot be imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anyformer.cli import main
from anyformer.config import save_yaml, to_dict
from anyformer.plugins import PluginError, import_plugin
from tests.helpers import REPO
from tests.training_helpers import tiny_config


def readme_extension() -> str:
    """The README's "Extending" example, up to the line that builds a model with it."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Extending anyformer"):].split("```python\n", 1)[1].split("```", 1)[0]
    code = block.split("\nmodel = ", 1)[0]
    assert '@ATTENTIONS.register("tempered")' in code
    return code + "\n"


def anyformer_command() -> list[str]:
    """The console script a user runs (it does not look in the working directory for modules,
    unlike `python -m`); `python -m anyformer` where it is not installed."""
    script = Path(sys.executable).parent / "anyformer"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "anyformer"]


def cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "ANYFORMER_PLUGINS"}
    environment.update(env or {})
    environment["PYTHONPATH"] = str(REPO)  # the package under test, not the tempered module's folder
    return subprocess.run(anyformer_command() + args, cwd=cwd, capture_output=True, text=True, env=environment, timeout=600)


TINY = ["--train.max_steps=3", "--train.eval_every=3", "--train.eval_batches=1", "--train.samples=0"]


def test_readme_extension_from_the_cli_with_import(tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "tempered.py").write_text(readme_extension())
    cfg = tiny_config(tmp_path)
    save_yaml(cfg, work / "base.yaml")

    # train: the kind is known through --import, and the run records the module
    done = cli(["train", "base.yaml", "--import", "tempered", "--model.attention.kind=tempered", *TINY, "--out", "run", "--quiet"], work)
    assert done.returncode == 0, done.stderr
    recorded = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert recorded["plugins"] == ["tempered"] and recorded["model"]["attention"]["kind"] == "tempered"
    # without --import, the same command names the unknown kind and the kinds it knows
    done = cli(["train", "base.yaml", "--model.attention.kind=tempered", *TINY, "--out", "other", "--quiet"], work)
    assert done.returncode == 2 and "unknown attention kind 'tempered'" in done.stderr and "Traceback" not in done.stderr
    assert not (work / "other").exists()

    # generate: the run's config brings the plugin back, no --import needed
    done = cli(["generate", "run", "--prompt", "ROMEO:", "--max-new-tokens", "5", "--temperature", "0"], work)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ROMEO:") and len(done.stdout.rstrip("\n")) > len("ROMEO:")
    # from another folder the module is not importable: one line that names it and what to do
    done = cli(["generate", str(work / "run"), "--max-new-tokens", "2"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "'tempered'" in done.stderr and "PYTHONPATH" in done.stderr and "config.yaml" in done.stderr
    # ... and --import of the file by its path serves it from there
    done = cli(["generate", str(work / "run"), "--max-new-tokens", "2", "--import", str(work / "tempered.py")], tmp_path)
    assert done.returncode == 0, done.stderr

    # bench attention: the measuring subprocesses import the plugin too
    done = cli(["bench", "attention", "--import", "tempered", "--methods", "tempered", "--lengths", "32", "--passes", "forward",
                "--causal", "yes", "--repeats", "1", "--threads", "1", "--out", "bench"], work)
    assert done.returncode == 0, done.stderr
    rows = json.loads((work / "bench" / "attention.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["tempered"] and "error" not in rows[0] and rows[0]["time_s"] > 0

    # compare: a variant names the kind; its training processes import the plugin
    spec = {"base": to_dict(cfg), "overrides": {"train.eval_every": 2, "train.samples": 0},
            "variants": {"mha": {}, "tempered": {"model.attention.kind": "tempered"}}, "budget": {"steps": 2}, "seeds": [0]}
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    done = cli(["compare", "spec.yaml", "--import", "tempered", "--out", "cmp", "--quiet"], work)
    assert done.returncode == 0, done.stderr
    results = json.loads((work / "cmp" / "results.json").read_text())
    assert {v["name"]: v["status"] for v in results["variants"]} == {"mha": "ok", "tempered": "ok"}
    run_cfg = yaml.safe_load((work / "cmp" / "tempered" / "seed_0" / "config.yaml").read_text())
    assert run_cfg["plugins"] == ["tempered"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_plugin_distribution(site: Path, kind: str) -> None:
    """An installed distribution (a dist-info folder on sys.path) whose `anyformer.plugins`
    entry point registers attention kind `kind`."""
    (site / "ep_variants.py").write_text(
        "from anyformer.nn.attention import ATTENTIONS, mha_from_config\n"
        f"ATTENTIONS.register({kind!r})(lambda cfg, ctx: mha_from_config(cfg, ctx))\n")
    info = site / "ep_variants-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-variants\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[anyformer.plugins]\nvariants = ep_variants\n")


def test_environment_variable_and_entry_points_name_plugins(tmp_path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    write_plugin_distribution(site, "from_entry_point")
    (tmp_path / "env_variant.py").write_text(
        "from anyformer.nn.attention import ATTENTIONS, mha_from_config\n"
        "ATTENTIONS.register('from_environment')(lambda cfg, ctx: mha_from_config(cfg, ctx))\n")
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{site}"}
    for kind, extra in (("from_entry_point", {}), ("from_environment", {"ANYFORMER_PLUGINS": str(tmp_path / "env_variant.py")})):
        environment = {k: v for k, v in os.environ.items() if k != "ANYFORMER_PLUGINS"} | env | extra
        done = subprocess.run([sys.executable, "-m", "anyformer", "info", "gpt2-small", f"--attention.kind={kind}"],
                              cwd=tmp_path, capture_output=True, text=True, env=environment, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "124" in done.stdout  # GPT-2 small's parameters (millions), built with the plugin's kind
    # a broken entry point names the distribution and its error
    (site / "ep_variants.py").write_text("raise RuntimeError('broken on purpose')\n")
    environment = {k: v for k, v in os.environ.items() if k != "ANYFORMER_PLUGINS"} | env
    done = subprocess.run([sys.executable, "-m", "anyformer", "info", "gpt2-small"], cwd=tmp_path, capture_output=True,
                          text=True, env=environment, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "ep_variants" in done.stderr and "broken on purpose" in done.stderr


def test_plugins_that_cannot_be_imported_are_named(tmp_path, capsys, learned_run) -> None:
    with pytest.raises(PluginError, match="no_such_plugin_module.*--import.*PYTHONPATH"):
        import_plugin("no_such_plugin_module", named_by="--import")
    with pytest.raises(PluginError, match="no such file"):
        import_plugin(str(tmp_path / "missing.py"), named_by="--import")
    (tmp_path / "needs_more.py").write_text("import another_missing_module\n")
    with pytest.raises(PluginError, match="it imports 'another_missing_module', which is missing"):
        import_plugin(str(tmp_path / "needs_more.py"), named_by="--import")
    (tmp_path / "raises.py").write_text("x = 1 / 0\n")
    with pytest.raises(PluginError, match="failed while importing: ZeroDivisionError"):
        import_plugin(str(tmp_path / "raises.py"), named_by="--import")
    with pytest.raises(PluginError, match="empty plugin module name"):
        import_plugin(" ", named_by="--import")

    # a run folder whose config names a module that is not there: every command says so in one line
    run = tmp_path / "run"
    shutil.copytree(learned_run.dir, run)
    data = yaml.safe_load((run / "config.yaml").read_text())
    data["plugins"] = ["no_such_plugin_module"]
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    before = snapshot(run)
    for argv in (["generate", str(run)], ["eval", str(run)], ["info", str(run)], ["train", "--resume", str(run)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no_such_plugin_module" in err[0] and str(run / "config.yaml") in err[0], (argv, err)
    assert snapshot(run) == before
    data["plugins"] = "not a list"
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    assert main(["info", str(run)]) == 2
    assert "plugins must be a list" in capsys.readouterr().err
