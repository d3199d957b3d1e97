"""`anyformer embed` on a sentence-transformers folder: its max length truncates, its
lower-casing applies, and its config is found in the transformer module's folder; against
sentence-transformers' recipe run on transformers' own classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anyformer.cli import main
from anyformer.config import ConfigError


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


def test_embed_on_a_training_run_names_the_commands_that_serve_it(learned_run, capsys) -> None:
    """A run folder is not a sentence encoder: one line, naming the run's task and its commands
    (was an AttributeError from deep inside)."""
    assert main(["embed", "--model", str(learned_run.dir), "some text"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a training run (task 'causal_lm')" in err and f"anyformer eval {learned_run.dir}" in err, err
