"""`anyformer convert` of a run folder and `save_pretrained(..., tokenizer=)`: the output loads
in transformers with the same logits, its tokenizer.json loads in AutoTokenizer and encodes a
sample of the training text to the run's own ids (char and byte tokenizers; BPE is the
`tokenizers` model itself); a run with no Hugging Face equivalent is refused with nothing
written, and a retry needs no --force."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from anyformer.cli import main
from anyformer.training import Trainer
from anyformer.training.run import load_run
from tests.helpers import FIXTURES
from tests.training_helpers import tiny_config

transformers = pytest.importorskip("transformers")
SAMPLE = "ROMEO:\nBut soft, what light through yonder window breaks?"


# the run kinds convert writes: each tokenizer kind, on the Llama layout (the default model) and GPT-2's
KINDS = {
    "char": ["--data.tokenizer=char"],
    "byte": ["--data.tokenizer=byte"],
    "bpe": ["--data.tokenizer=bpe", "--data.vocab_size=300"],
    "gpt2": ["--data.tokenizer=char", "--model.positional.kind=learned", "--model.norm.kind=layernorm", "--model.ffn.kind=mlp",
             "--model.ffn.bias=true", "--model.attention.bias=true"],
}


@pytest.fixture(scope="module", params=list(KINDS))
def run(request, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp(f"convert_{request.param}")
    cfg = tiny_config(tmp, *KINDS[request.param], "--train.max_steps=2", "--train.eval_every=2")
    Trainer(cfg, run_dir=tmp / "run", verbose=False).fit()
    return tmp / "run"


def test_a_converted_run_loads_in_transformers_with_its_tokenizer(run: Path, tmp_path: Path, capsys) -> None:
    dst = tmp_path / "hf"
    assert main(["convert", str(run), str(dst)]) == 0
    r = load_run(run, device="cpu")
    tok = transformers.AutoTokenizer.from_pretrained(dst)
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert ids == r.tokenizer.encode(SAMPLE) and tok.decode(ids) == SAMPLE
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    x = torch.tensor([ids[:32]])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, r.model(x), atol=1e-4)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_save_pretrained_writes_the_runs_tokenizer(run: Path, tmp_path: Path) -> None:
    import anyformer

    r = load_run(run, device="cpu")
    anyformer.save_pretrained(r.model, tmp_path / "saved", tokenizer=r.tokenizer)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert tok(SAMPLE, add_special_tokens=False)["input_ids"] == r.tokenizer.encode(SAMPLE)


def test_a_run_with_no_hugging_face_equivalent_is_refused_with_nothing_written(tmp_path: Path, capsys) -> None:
    vit = shutil.copytree(FIXTURES / "vit_run_before_arch_options", tmp_path / "vit")
    before = sorted((p.relative_to(vit), p.read_bytes()) for p in vit.rglob("*") if p.is_file())
    dst = tmp_path / "out"
    assert main(["convert", str(vit), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "anyformer convert: error: this model has no Hugging Face equivalent" in err and "Traceback" not in err, err
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["vit"]  # no partial folder either
    assert sorted((p.relative_to(vit), p.read_bytes()) for p in vit.rglob("*") if p.is_file()) == before


def test_a_failed_convert_leaves_no_half_written_folder_and_a_retry_needs_no_force(run: Path, tmp_path: Path, monkeypatch,
                                                                                   capsys) -> None:
    import anyformer.commands.convert as convert

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ValueError("disk full")

    dst = tmp_path / "hf"
    monkeypatch.setattr(convert, "_add_token_ids", broken)  # fails after the model and tokenizer are written
    assert main(["convert", str(run), str(dst)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert not dst.exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    assert main(["convert", str(run), str(dst)]) == 0  # no --force needed: nothing was left
    assert (dst / "tokenizer.json").is_file() and (dst / "config.json").is_file()


def test_a_converted_run_generates_in_transformers_as_it_does_here(run: Path, tmp_path: Path) -> None:
    from anyformer.generation import GenerationConfig, generate

    dst = tmp_path / "hf"
    assert main(["convert", str(run), str(dst)]) == 0
    r = load_run(run, device="cpu")
    settings = transformers.GenerationConfig.from_pretrained(dst)
    assert (settings.do_sample, settings.temperature, settings.top_k) == (True, 0.8, 0)  # the run's sample settings (defaults)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    prompt = r.tokenizer.encode("ROMEO:")
    with torch.no_grad():
        ours = generate(r.model, prompt, GenerationConfig(max_new_tokens=12, do_sample=False))
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, pad_token_id=0)[0, len(prompt):]
    assert ours[0, len(prompt):].tolist() == theirs.tolist()


def test_convert_refuses_a_folder_holding_other_files(run: Path, tmp_path: Path, capsys) -> None:
    dst = tmp_path / "notes"
    dst.mkdir()
    (dst / "todo.txt").write_text("keep me")
    assert main(["convert", str(run), str(dst), "--force"]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["todo.txt"]
