"""CLI clean-ups: one sampler for every generation path, sentence-transformers' max length in
`embed`, RMSNorm refusing a bias, and `bench attention` refusing bad arguments."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from anyformer.cli import main
from anyformer.config import ConfigError, apply_overrides
from anyformer.generation import GenerationConfig, stream
from anyformer.generation.window import stream_window, window_steps
from anyformer.training import Trainer
from anyformer.training.config import default_run_config
from tests.helpers import build
from tests.training_helpers import tiny_config

# ------------------------------------------------------------------ 1. one sampler


def tiny(**overrides: object) -> torch.nn.Module:
    """A tiny decoder (rmsnorm asked for no bias explicitly, whatever NormConfig's default)."""
    return build(norm__bias=False, **overrides)


def naive_greedy(model: torch.nn.Module, ids: list[int], new: int, context: int) -> list[int]:
    """Greedy decoding written out: argmax over model(last `context` tokens), no cache."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(new):
            tokens = torch.cat([tokens, model(tokens[:, -context:])[:, -1].argmax(-1, keepdim=True)], 1)
    return tokens[0, len(ids):].tolist()


def test_window_greedy_equals_argmax_over_the_cropped_context() -> None:
    model = tiny(positional__kind="learned", max_seq_len=12)
    ids = [5, 9, 2, 7, 1]
    got = list(stream_window(model, ids, GenerationConfig(max_new_tokens=30), context=12))
    assert got == naive_greedy(model, ids, 30, 12)  # 35 tokens: 23 steps past the learned table's 12


@pytest.mark.parametrize("settings", [
    dict(top_p=0.8, temperature=1.3),
    dict(top_k=5, min_p=0.05, repetition_penalty=1.3),
])
def test_window_sampler_equals_the_cached_stream_when_nothing_is_cropped(settings: dict) -> None:
    model = tiny(positional__kind="rope")  # max_seq_len 64: prompt + new tokens fit
    ids = [3, 14, 15, 92, 65]
    config = GenerationConfig(max_new_tokens=20, do_sample=True, seed=7, **settings)
    cached = list(stream(model, ids, config))
    assert list(stream_window(model, ids, config)) == cached
    other_seed = list(stream_window(model, ids, config.with_overrides(seed=8)))
    assert other_seed != cached  # the seed is honoured, so the equality above is not vacuous


def test_window_stops_at_a_stop_token() -> None:
    model = tiny(positional__kind="learned", max_seq_len=12)
    ids = [5, 9, 2, 7, 1]
    free = naive_greedy(model, ids, 20, 12)
    stop = free[6]
    got = list(stream_window(model, ids, GenerationConfig(max_new_tokens=20, stop_tokens=[stop]), context=12))
    assert got == free[: free.index(stop) + 1]


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory) -> SimpleNamespace:
    """A tiny trained run with learned (absolute) positions and a context of 32 tokens."""
    tmp = tmp_path_factory.mktemp("learned")
    cfg = tiny_config(tmp, "--model.positional.kind=learned", "--model.norm.bias=false", "--train.samples=2",
                      "--task.options.sample_tokens=40", "--task.options.temperature=0")
    cfg.task.options["sample_prompt"] = "MACBETH:"
    trainer = Trainer(cfg, run_dir=tmp / "run", verbose=False)
    result = trainer.fit()
    return SimpleNamespace(dir=tmp / "run", trainer=trainer, result=result)


def test_trainer_samples_past_the_context_use_the_window_sampler(learned_run: SimpleNamespace) -> None:
    trainer = learned_run.trainer
    tok = trainer.data.tokenizer
    ids = tok.encode("MACBETH:")
    trainer.model.eval()
    want = "MACBETH:" + tok.decode(naive_greedy(trainer.model, ids, 40, 32))  # 8 + 40 tokens > 32
    assert learned_run.result.samples == [want, want]
    # top_k=1 keeps only the most likely token: sampling at any temperature is then greedy
    trainer.task.options.temperature, trainer.task.options.top_k = 1.7, 1
    assert trainer.samples() == [want, want]


def test_generate_past_the_context_honours_top_p(learned_run: SimpleNamespace, capsys) -> None:
    from anyformer.training.run import load_run

    r = load_run(learned_run.dir)
    ids = r.tokenizer.encode("MACBETH:")
    want = "MACBETH:" + r.tokenizer.decode(naive_greedy(r.model, ids, 40, 32))
    # a tiny top-p keeps only the most likely token, so sampling at temperature 2 is greedy
    args = ["generate", str(learned_run.dir), "--prompt", "MACBETH:", "--max-new-tokens", "40", "--temperature", "2",
            "--top-p", "0.001", "--seed", "0"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert out.out == want + "\n" and "recomputing the last 32 tokens" in out.err


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


# ------------------------------------------------------------------ 2. embed: the checkpoint's max length

WORDS = "the cat sat on a mat and dog ran to red big house".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_sentence_model(folder: Path, *, max_seq_length: int, do_lower_case: bool) -> Path:
    """A tiny BERT saved as a sentence-transformers folder: weights, a WordPiece tokenizer with a
    lower-case vocabulary, mean pooling + Normalize, and sentence_bert_config.json."""
    import anyformer
    from anyformer import build_model, preset
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    torch.manual_seed(0)
    model = build_model(preset("bert-tiny", vocab_size=len(vocab)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    anyformer.save_pretrained(model, folder)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 128, "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": do_lower_case}))
    return folder


def reference_embeddings(folder: Path, texts: list[str], max_length: int | None) -> torch.Tensor:
    """sentence-transformers' recipe on transformers' own classes: tokenizer truncation to
    max_length, BertModel, mean over real tokens, L2-normalise."""
    import transformers
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="[PAD]")
    hf = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    enc = hf_tok(texts, padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**enc).last_hidden_state
    w = enc["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * w).sum(1) / w.sum(1), dim=-1)


LONG = "the big red dog ran to the house and the cat sat on a mat"  # 15 word tokens


def test_embed_truncates_at_the_sentence_transformers_max_length(tmp_path: Path, capsys) -> None:
    from anyformer.pretrained import load_pretrained
    from anyformer.pretrained.embed import embed_sentences, sentence_pooling

    folder = write_sentence_model(tmp_path / "st", max_seq_length=8, do_lower_case=False)
    model, tok = load_pretrained(folder)
    pooling = sentence_pooling(folder)
    assert (pooling.max_len, pooling.lower_case, pooling.pooling, pooling.normalize) == (8, False, "mean", True)
    ours = embed_sentences(model, tok, [LONG, "the cat"], pooling=pooling)
    # by hand: [CLS], the first 6 words, [SEP] (the text is cut, the special tokens stay)
    ids = [SPECIAL.index("[CLS]")] + [len(SPECIAL) + WORDS.index(w) for w in LONG.split()[:6]] + [SPECIAL.index("[SEP]")]
    hand = model.embed_sentences(torch.tensor([ids]), torch.ones(1, 8, dtype=torch.long), pooling="mean", normalize=True)
    torch.testing.assert_close(ours[0], hand[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, reference_embeddings(folder, [LONG, "the cat"], 8), atol=1e-5, rtol=0)
    untruncated = reference_embeddings(folder, [LONG], None)[0]
    assert (ours[0] - untruncated).abs().max() > 1e-3  # the limit matters for this input
    # the command says which limit it used, and writes the same vectors
    out = tmp_path / "emb.json"
    assert main(["embed", "--model", str(folder), "--out", str(out), LONG]) == 0
    assert "at most 8 tokens per sentence from sentence_bert_config.json max_seq_length" in capsys.readouterr().err
    torch.testing.assert_close(torch.tensor(json.loads(out.read_text())["embeddings"][0]), hand[0], atol=1e-5, rtol=0)


def test_embed_lower_cases_when_the_checkpoint_says_so(tmp_path: Path) -> None:
    from anyformer.pretrained import load_pretrained
    from anyformer.pretrained.embed import embed_sentences, sentence_pooling

    shouting = "THE Cat SAT"  # upper-case words are [UNK] in this lower-case vocabulary
    lower = write_sentence_model(tmp_path / "lower", max_seq_length=8, do_lower_case=True)
    model, tok = load_pretrained(lower)
    got = embed_sentences(model, tok, [shouting], pooling=sentence_pooling(lower))
    torch.testing.assert_close(got, reference_embeddings(lower, ["the cat sat"], 8), atol=1e-5, rtol=0)
    keep = write_sentence_model(tmp_path / "keep", max_seq_length=8, do_lower_case=False)
    got = embed_sentences(model, tok, [shouting], pooling=sentence_pooling(keep))
    torch.testing.assert_close(got, reference_embeddings(keep, [shouting], 8), atol=1e-5, rtol=0)
    assert (got - reference_embeddings(keep, ["the cat sat"], 8)).abs().max() > 1e-3


def test_sentence_bert_config_is_read_from_the_transformer_module_folder(tmp_path: Path) -> None:
    from anyformer.pretrained.embed import sentence_pooling

    (tmp_path / "0_Transformer").mkdir()
    (tmp_path / "0_Transformer" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 5}))
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}]))
    assert sentence_pooling(tmp_path).max_len == 5
    (tmp_path / "0_Transformer" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 0}))
    with pytest.raises(ConfigError, match="max_seq_length must be a positive integer"):
        sentence_pooling(tmp_path)


# ------------------------------------------------------------------ 4. bench attention: arguments and failures


@pytest.fixture
def fake_bench(monkeypatch) -> list[dict]:
    """Record the configurations `bench attention` would run instead of running them."""
    import anyformer.bench.attention as bench

    calls: list[dict] = []

    def run_one(spec: dict, timeout: float) -> dict:
        calls.append(spec)
        return {"error": f"RuntimeError: boom at n={spec['n']}"}

    monkeypatch.setattr(bench, "run_one", run_one)
    monkeypatch.setattr(bench, "plot", lambda results, path: None)
    return calls


CHEAP = ["bench", "attention", "--methods", "mha[eager]", "--causal", "yes", "--passes", "forward"]


@pytest.mark.parametrize("option, message", [
    (["--lengths", "-1"], "--lengths must be positive integers, got [-1]"),
    (["--lengths", "64,0"], "--lengths must be positive integers, got [0]"),
    (["--lengths", ","], "--lengths is empty"),
    (["--methods", ","], "--methods is empty"),
    (["--heads", "0"], "--heads must be a positive integer"),
    (["--head-dim", "-8"], "--head-dim must be a positive integer"),
    (["--window", "0"], "--window must be a positive integer"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--repeats", "0"], "--repeats must be a positive integer"),
    (["--rounds", "0"], "--rounds must be a positive integer"),
    (["--max-seconds", "0"], "--max-seconds must be positive"),
    (["--max-memory-gb", "-1"], "--max-memory-gb must be positive"),
    (["--min-time", "-0.5"], "--min-time must be >= 0"),
    (["--positional", "nope"], "unknown positional encoding 'nope'"),
])
def test_bench_attention_refuses_bad_arguments_before_running(fake_bench: list, tmp_path: Path, capsys,
                                                              option: list[str], message: str) -> None:
    assert main([*CHEAP, "--lengths", "64", *option, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("anyformer bench: error: ") and message in err and err.count("\n") == 1, err
    assert fake_bench == [] and not (tmp_path / "out").exists()


def test_bench_attention_fails_when_every_configuration_fails(fake_bench: list, tmp_path: Path, capsys) -> None:
    assert main([*CHEAP, "--lengths", "64,128", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert len(fake_bench) == 1  # the method failed at 64, so 128 was skipped
    assert "0 measured, 1 skipped, 1 failed" in out.out
    assert "no configuration could be measured" in out.err and "boom at n=64" in out.err


def test_bench_attention_runs_one_tiny_configuration(tmp_path: Path, capsys) -> None:
    """A real measurement (one fresh process) still exits 0."""
    args = [*CHEAP, "--lengths", "16", "--heads", "1", "--head-dim", "4", "--threads", "1", "--min-time", "0",
            "--repeats", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "attention.json").read_text())["results"]
    assert [(r["method"], r["n"], "time_s" in r) for r in rows] == [("mha[eager]", 16, True)]


# ------------------------------------------------------------------ 3. RMSNorm has no bias


def test_rmsnorm_refuses_a_bias_and_matches_torch() -> None:
    from anyformer.nn.norm import RMSNorm

    with pytest.raises(ValueError, match=r"RMSNorm has no bias.*model\.norm\.bias=false.*layernorm"):
        RMSNorm(8, bias=True)
    ours = RMSNorm(8, eps=1e-5)
    ref = torch.nn.RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(8))
        ref.weight.copy_(ours.weight)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(ours(x), ref(x))
    assert [name for name, _ in ours.named_parameters()] == ["weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_the_formula_in_float64(dtype: torch.dtype) -> None:
    """fp32 (one fused call) and bf16 (fp32 statistics, one rounding) against the formula."""
    from anyformer.nn.norm import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = (torch.randn(4, 7, 48) * 3).to(dtype)
    xd, wd = x.double(), norm.weight.double()
    want = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=8e-3)
    torch.testing.assert_close(norm(x).double(), want.to(dtype).double() if dtype != torch.float32 else want, **tol)


def test_model_config_asking_rmsnorm_for_a_bias_is_refused() -> None:
    with pytest.raises(ValueError, match="bias"):
        build(norm__kind="rmsnorm", norm__bias=True)
    model = build(norm__kind="rmsnorm", norm__bias=False)
    assert not any(n.endswith("norm.bias") for n, _ in model.named_parameters())
    with_bias = build(norm__kind="layernorm", norm__bias=True)
    assert any(n.endswith("norm.bias") for n, _ in with_bias.named_parameters())


def test_run_folders_written_with_an_ignored_rmsnorm_bias_still_load(learned_run: SimpleNamespace, tmp_path: Path) -> None:
    """Run folders saved before RMSNorm refused a bias say `norm: {kind: rmsnorm, bias: true}`;
    their weights have no bias, so they load as the same model."""
    import shutil

    import yaml

    from anyformer.training.run import load_run

    run = shutil.copytree(learned_run.dir, tmp_path / "old")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["norm"] = {**cfg["model"]["norm"], "kind": "rmsnorm", "bias": True}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert load_run(learned_run.dir).cfg.model.norm.kind == "rmsnorm"  # the run trained with one
    r = load_run(run)
    assert r.cfg.model.norm.bias is False
    x = torch.randint(0, r.cfg.model.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), load_run(learned_run.dir).model(x))
