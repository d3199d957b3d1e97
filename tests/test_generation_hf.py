"""Greedy and beam-search tokens equal Hugging Face `generate` on the same random weights
(GPT-2 and Llama shapes). The HF -> anyformer weight mapping here is a small local helper for
these tests only; the library's converters live in anyformer.convert."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from anyformer.generation import generate  # noqa: E402
from anyformer.models.builders import build_model  # noqa: E402
from anyformer.models.presets import preset  # noqa: E402

PAD = 1


def _gpt2_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    hf_cfg = transformers.GPT2Config(
        vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4, activation_function="gelu_new",
        initializer_range=0.3, bos_token_id=0, eos_token_id=0, pad_token_id=PAD,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = build_model(preset("gpt2-tiny")).eval()
    sd = hf.state_dict()
    new = {"embed.tokens.weight": sd["transformer.wte.weight"], "positional.table.weight": sd["transformer.wpe.weight"]}
    for i in range(2):
        p, q = f"transformer.h.{i}.", f"stack.blocks.{i}."
        w, bias = sd[p + "attn.c_attn.weight"].t(), sd[p + "attn.c_attn.bias"]  # Conv1D stores (in, out)
        for j, name in enumerate("qkv"):
            new[q + f"attn.sublayer.{name}_proj.weight"] = w[64 * j : 64 * (j + 1)]
            new[q + f"attn.sublayer.{name}_proj.bias"] = bias[64 * j : 64 * (j + 1)]
        new[q + "attn.sublayer.o_proj.weight"] = sd[p + "attn.c_proj.weight"].t()
        new[q + "attn.sublayer.o_proj.bias"] = sd[p + "attn.c_proj.bias"]
        new[q + "ffn.sublayer.up.weight"] = sd[p + "mlp.c_fc.weight"].t()
        new[q + "ffn.sublayer.up.bias"] = sd[p + "mlp.c_fc.bias"]
        new[q + "ffn.sublayer.down.weight"] = sd[p + "mlp.c_proj.weight"].t()
        new[q + "ffn.sublayer.down.bias"] = sd[p + "mlp.c_proj.bias"]
        for a, b in (("ln_1", "attn.norm"), ("ln_2", "ffn.norm")):
            new[q + b + ".weight"], new[q + b + ".bias"] = sd[p + a + ".weight"], sd[p + a + ".bias"]
    new["stack.final_norm.weight"], new["stack.final_norm.bias"] = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
    new["lm_head.proj.weight"] = sd["transformer.wte.weight"]
    ours.load_state_dict(new, strict=True)
    return hf, ours


def _llama_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    hf_cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        initializer_range=0.3, bos_token_id=0, eos_token_id=0, pad_token_id=PAD,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = build_model(preset("llama-tiny")).eval()
    sd = hf.state_dict()
    new = {"embed.tokens.weight": sd["model.embed_tokens.weight"], "lm_head.proj.weight": sd["lm_head.weight"],
           "stack.final_norm.weight": sd["model.norm.weight"]}
    for i in range(2):
        p, q = f"model.layers.{i}.", f"stack.blocks.{i}."
        for name in "qkvo":
            new[q + f"attn.sublayer.{name}_proj.weight"] = sd[p + f"self_attn.{name}_proj.weight"]
        for name in ("gate", "up", "down"):
            new[q + f"ffn.sublayer.{name}.weight"] = sd[p + f"mlp.{name}_proj.weight"]
        new[q + "attn.norm.weight"] = sd[p + "input_layernorm.weight"]
        new[q + "ffn.norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    ours.load_state_dict(new, strict=True)
    return hf, ours


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
