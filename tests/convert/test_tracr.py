"""RASP programs compiled by tracr, loaded into anyformer encoders: the same outputs as tracr's
own forward (decoded values identical, residual streams equal to float precision) on every
input tried, for the five programs of configs/theory/programs; the command line (convert
--from tracr, then predict and eval) against the programs written in plain Python; and the
errors for what cannot be converted."""

from __future__ import annotations

import collections
import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from anyformer.cli import main
from tests.helpers import REPO

pytest.importorskip("tracr", reason="tracr is an optional extra: pip install 'anyformer[tracr]' (tests/convert/test_tracr.py)")

from anyformer.convert.tracr import TracrError, compile_program, input_words, load_program, to_anyformer  # noqa: E402
from anyformer.models import build_model  # noqa: E402

PROGRAMS = REPO / "configs" / "theory" / "programs"
NAMES = ["length", "reverse", "sort", "histogram", "frac_prevs"]


def in_python(name: str, xs: list) -> list:
    """What each program computes, written in plain Python (the reference of the CLI test)."""
    if name == "length":
        return [len(xs)] * len(xs)
    if name == "reverse":
        return xs[::-1]
    if name == "sort":
        return sorted(xs)
    if name == "histogram":
        counts = collections.Counter(xs)
        return [counts[x] for x in xs]
    return [sum(t == "x" for t in xs[: i + 1]) / (i + 1) for i in range(len(xs))]


@pytest.fixture(scope="module")
def compiled() -> dict:
    out = {}
    for name in NAMES:
        prog = load_program(PROGRAMS / f"{name}.py")
        assembled = compile_program(prog)
        converted = to_anyformer(assembled, input_words(prog))
        model = build_model(converted.config)
        model.load_state_dict(converted.state_dict)
        out[name] = (prog, assembled, converted, model.eval())
    return out


def inputs_to_try(prog, per_length: int = 24) -> list[tuple]:
    """Up to `per_length` inputs of every length 1..max_seq_len (all of them where there are fewer)."""
    words = [str(v) for v in prog.vocab]
    rng = random.Random(0)
    out = []
    for n in range(1, prog.max_seq_len + 1):
        if len(words) ** n <= per_length:
            out += list(itertools.product(words, repeat=n))
        else:
            out += [tuple(rng.choice(words) for _ in range(n)) for _ in range(per_length)]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_compiled_program_equals_tracrs_forward_on_every_input_tried(compiled, name: str) -> None:
    import jax
    import jax.numpy as jnp

    prog, assembled, converted, model = compiled[name]
    forward = jax.jit(assembled.forward)
    ids = {w: i for i, w in enumerate(converted.inputs)}
    by_word = {str(v): v for v in prog.vocab}
    tried = inputs_to_try(prog)
    for n in range(1, prog.max_seq_len + 1):
        rows = [r for r in tried if len(r) == n]
        theirs_ids = jnp.array([assembled.input_encoder.encode([prog.bos, *(by_word[w] for w in r)]) for r in rows])
        theirs = forward(assembled.params, theirs_ids)  # tracr's forward, a batch of equal lengths
        ours_ids = torch.tensor([[ids[prog.bos], *(ids[w] for w in r)] for r in rows])
        with torch.no_grad():
            hidden, out = model.hidden(ours_ids), model(ours_ids)
        np.testing.assert_allclose(hidden.double().numpy(), np.asarray(theirs.transformer_output.output, dtype=np.float64),
                                   atol=1e-5, rtol=0)
        want = np.asarray(theirs.unembedded_output)[:, 1:]
        if converted.outputs is None:  # numerical: the value read out
            np.testing.assert_allclose(out[:, 1:, 0].double().numpy(), want, atol=1e-5, rtol=0)
        else:  # categorical: the same label at every position of every input
            decoded = [[assembled.output_encoder.decode([int(i)])[0] for i in row] for row in want]
            assert [[converted.outputs[i] for i in row] for row in out[:, 1:].argmax(-1).tolist()] == \
                [[str(v) for v in row] for row in decoded], (name, n)


@pytest.mark.parametrize("name", NAMES)
def test_convert_from_tracr_then_predict_computes_the_program(tmp_path: Path, capsys, name: str) -> None:
    out = tmp_path / name
    assert main(["convert", "--from", "tracr", str(PROGRAMS / f"{name}.py"), str(out)]) == 0
    prog = load_program(PROGRAMS / f"{name}.py")
    rng = random.Random(1)
    cases = [[rng.choice(prog.vocab) for _ in range(rng.randint(1, prog.max_seq_len))] for _ in range(6)]
    cases.append([prog.vocab[0]] * prog.max_seq_len)
    capsys.readouterr()
    assert main(["predict", str(out), *(" ".join(map(str, xs)) for xs in cases)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(cases)
    for line, xs in zip(lines, cases):
        given, answer = line.split(" -> ")
        assert given.split() == [str(x) for x in xs]
        want = in_python(name, xs)
        if name == "frac_prevs":
            assert np.allclose([float(v) for v in answer.split()], want, atol=1e-5), (line, want)
        else:
            assert answer.split() == [str(v) for v in want], (line, want)


def test_eval_of_a_compiled_run_is_exact_on_the_held_out_inputs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "hist"
    assert main(["convert", "--from", "tracr", str(PROGRAMS / "histogram.py"), str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.strip())
    assert float(rows["accuracy"]) == 1.0 and float(rows["exact_inputs"]) == 1.0
    assert float(rows["majority_accuracy"]) < 0.6  # the baseline is far from it


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "prog.py"
    p.write_text("from tracr.rasp import rasp\n" + text)
    return p


def test_an_unsupported_rasp_operation_is_named(tmp_path: Path) -> None:
    p = write(tmp_path, "vocab = {1, 2}\nmax_seq_len = 4\n"
              "num = rasp.numerical(rasp.Map(lambda x: x, rasp.tokens)).named('as_number')\n"
              "program = rasp.Aggregate(rasp.Select(num, rasp.tokens, rasp.Comparison.EQ).named('by_number'), rasp.tokens)\n")
    with pytest.raises(TracrError, match=r"tracr cannot compile .*by_number: Select keys must be categorical"):
        compile_program(load_program(p))


@pytest.mark.parametrize("text, message", [
    ("vocab = {1}\n", r"does not define program, max_seq_len"),
    ("vocab = {1}\nmax_seq_len = 0\nprogram = rasp.tokens\n", r"max_seq_len .* must be a positive integer, got 0"),
    ("vocab = set()\nmax_seq_len = 3\nprogram = rasp.tokens\n", r"vocab .* is empty"),
    ("vocab = {'a b'}\nmax_seq_len = 3\nprogram = rasp.tokens\n", r"distinct single words"),
    ("vocab = {1}\nmax_seq_len = 3\nprogram = 5\n", r"is a int, not a RASP sequence operation"),
    ("raise RuntimeError('boom')\n", r"running program file .* failed: RuntimeError: boom"),
])
def test_bad_program_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TracrError, match=message):
        load_program(write(tmp_path, text))


def test_bad_command_lines_give_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "rev"
    assert main(["convert", "--from", "tracr", str(PROGRAMS / "reverse.py"), str(out)]) == 0
    capsys.readouterr()
    for argv, message in [
        (["predict", str(out), "a e"], "'e' is not in the vocabulary (BOS PAD a b c d)"),
        (["predict", str(out), "a " * 9], "the input has 9 tokens; this program reads at most 8"),
        (["predict", str(out), "BOS a"], "the input holds BOS or PAD, which the program adds itself"),
        (["convert", "--from", "tracr", str(PROGRAMS / "reverse.py"), str(out)], "already exists; give a new folder"),
        (["train", "--resume", str(out)], "holds weights only, no training state"),
        (["export", str(out), str(tmp_path / "exported")], "holds weights only, no training state"),
        (["convert", "--from", "tracr", str(tmp_path / "none.py"), str(tmp_path / "x")], "is not a .py file"),
    ]:
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_without_tracr_the_error_names_the_extra(monkeypatch) -> None:
    import importlib.util

    from anyformer.convert import tracr

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tracr" else object())
    with pytest.raises(TracrError, match=r"pip install 'anyformer\[tracr\]'"):
        tracr.require_tracr()
