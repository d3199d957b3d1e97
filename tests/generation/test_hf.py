"""Greedy and beam-search tokens equal Hugging Face `generate` on the same random weights
(GPT-2 and Llama shapes), with weights copied by the library's converters (anyformer.convert)."""

from __future__ import annotations

import pytest
import torch

import transformers

from anyformer.generation import generate  # noqa: E402
from anyformer.convert.hf import model_from_hf  # noqa: E402

PAD = 1


def _pair(hf: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The HF model and an anyformer model built from it by the library's converter."""
    ours = model_from_hf(hf.config.to_dict(), hf.state_dict())
    return hf.eval(), ours.eval()


def _gpt2_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    hf_cfg = transformers.GPT2Config(
        vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4, activation_function="gelu_new",
        initializer_range=0.3, bos_token_id=0, eos_token_id=0, pad_token_id=PAD,
    )
    return _pair(transformers.GPT2LMHeadModel(hf_cfg))


def _llama_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    hf_cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        initializer_range=0.3, bos_token_id=0, eos_token_id=0, pad_token_id=PAD,
    )
    return _pair(transformers.LlamaForCausalLM(hf_cfg))


PAIRS = {"gpt2": _gpt2_pair, "llama": _llama_pair}
PROMPTS = [[5, 17, 99, 3, 250, 7], [42, 8, 301], [11, 12, 13, 14]]


def _hf_batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(map(len, prompts))
    ids = torch.full((len(prompts), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :] = torch.tensor(p)
        mask[i, n - len(p) :] = 1
    return ids, mask


def _hf_generate(hf: torch.nn.Module, prompts: list[list[int]], **kw: object) -> torch.Tensor:
    ids, mask = _hf_batch(prompts)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, **kw)


@pytest.fixture(scope="module", params=list(PAIRS))
def pair(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return PAIRS[request.param]()


def test_logits_match_hf(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    hf, ours = pair
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=2e-4, rtol=1e-4)


def test_greedy_matches_hf(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    hf, ours = pair
    want = _hf_generate(hf, PROMPTS, max_new_tokens=12, eos_token_id=None)
    got = generate(ours, PROMPTS, max_new_tokens=12, pad_token_id=PAD)
    assert torch.equal(got, want)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.7])
def test_beam_search_matches_hf(pair: tuple[torch.nn.Module, torch.nn.Module], length_penalty: float) -> None:
    hf, ours = pair
    # a stop token that the greedy continuation uses, so beams finish at different lengths
    greedy = generate(ours, PROMPTS, max_new_tokens=6, pad_token_id=PAD)
    eos = int(greedy[0, -3])
    for prompts in (PROMPTS, PROMPTS[1:2]):
        want = _hf_generate(hf, prompts, max_new_tokens=10, num_beams=3, eos_token_id=eos, length_penalty=length_penalty)
        got = generate(ours, prompts, max_new_tokens=10, num_beams=3, stop_tokens=[eos], pad_token_id=PAD,
                       length_penalty=length_penalty)
        assert torch.equal(got, want), (got, want)


def test_beam_search_without_stop_tokens_matches_hf(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    hf, ours = pair
    want = _hf_generate(hf, PROMPTS, max_new_tokens=8, num_beams=4, eos_token_id=None)
    got = generate(ours, PROMPTS, max_new_tokens=8, num_beams=4, pad_token_id=PAD)
    assert torch.equal(got, want)


def test_repetition_penalty_and_ngram_match_hf(pair: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    hf, ours = pair
    want = _hf_generate(hf, PROMPTS, max_new_tokens=12, eos_token_id=None, repetition_penalty=1.3, no_repeat_ngram_size=2)
    got = generate(ours, PROMPTS, max_new_tokens=12, pad_token_id=PAD, repetition_penalty=1.3, no_repeat_ngram_size=2)
    assert torch.equal(got, want)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_single_prompt_with_fast_decoding_matches_hf(pair: tuple[torch.nn.Module, torch.nn.Module], prompt: list[int]) -> None:
    """compile=True (the default) at batch 1 runs the one-row linear layers as native GEMVs
    where the kernels build; its greedy tokens must still be HF's."""
    hf, ours = pair
    want = _hf_generate(hf, [prompt], max_new_tokens=12, eos_token_id=None)
    assert torch.equal(generate(ours, prompt, max_new_tokens=12, compile=True), want)
