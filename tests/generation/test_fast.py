"""Compiled one-row linear layers for decoding (GenerationConfig.compile): the GEMV matches
torch's linear, other calls pass through untouched, and greedy tokens equal Hugging Face's."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from anyformer import build_model

from anyformer.generation import generate
from anyformer.generation.fast import FastLinears, gemv


@pytest.mark.parametrize("bias", [True, False])
def test_gemv_matches_linear(bias: bool) -> None:
    torch.manual_seed(0)
    w, x = torch.randn(37, 19), torch.randn(19)
    b = torch.randn(37) if bias else None
    torch.testing.assert_close(gemv(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_gemv_bf16_accumulates_in_fp32() -> None:
    torch.manual_seed(0)
    w, x = torch.randn(64, 4096).bfloat16(), torch.randn(4096).bfloat16()
    exact = (w.double() * x.double()).sum(-1)
    got = gemv(x, w, None)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=1e-2)


def test_mode_passes_multi_row_and_grad_calls_through() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5)
    rows = torch.randn(3, 8)
    with FastLinears(lin) as mode:
        out = lin(rows)
        one = lin(torch.randn(1, 8, requires_grad=True))  # weight needs grad: plain linear keeps autograd
    assert torch.equal(out, F.linear(rows, lin.weight, lin.bias))
    assert one.requires_grad and not mode.failed


def test_compiled_decoding_matches_hf_greedy() -> None:
    import transformers
    from anyformer.convert.hf import model_from_hf

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, initializer_range=0.3,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=1)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    ours = model_from_hf(hf.config.to_dict(), hf.state_dict()).eval()
    prompt = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                           min_new_tokens=12, pad_token_id=1)
    assert torch.equal(generate(ours, prompt, max_new_tokens=12, compile=True), want)


def _native_or_skip():  # type: ignore[no-untyped-def]
    from anyformer.generation.fast import native_gemv

    module = native_gemv()
    if module is None:
        pytest.skip("the C++ GEMV kernel needs a C++ toolchain and an AVX-512 BF16 CPU")
    return module


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (64, 768), (130, 33), (257, 100), (3, 1000)])
def test_native_gemv_equals_float64_product(shape: tuple[int, int], dtype: torch.dtype, threads: int) -> None:
    """Odd sizes exercise the masked tails and the row split; the kernel sums exact products in
    fp32, so it must sit within fp32 summation error of the float64 product of the same values,
    plus one rounding to the output dtype."""
    module = _native_or_skip()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(shape[0] * 1000 + shape[1])
        o, k = shape
        w, x, b = torch.randn(o, k).to(dtype), torch.randn(k).to(dtype), torch.randn(o).to(dtype)
        for bias in (None, b):
            exact = w.double() @ x.double() + (0 if bias is None else bias.double())
            got = module.gemv(x, w, bias)
            assert got.dtype == dtype and got.shape == (o,)
            # fp32 accumulation error ~ k * eps32 * sum|w x|; then one rounding to dtype
            scale = (w.double().abs() @ x.double().abs()) + (0 if bias is None else bias.double().abs())
            tol = scale * k * 2.0**-23 + exact.abs() * (2.0**-8 if dtype == torch.bfloat16 else 2.0**-23) + 1e-12
            assert ((got.double() - exact).abs() <= tol).all()
    finally:
        torch.set_num_threads(old)


def test_fast_gemv_falls_back_for_mixed_dtypes_and_strided_weights() -> None:
    from anyformer.generation.fast import fast_gemv

    torch.manual_seed(0)
    w = torch.randn(24, 40)
    x = torch.randn(24)
    torch.testing.assert_close(fast_gemv(x, w.t(), None), F.linear(x, w.t()), rtol=1e-5, atol=1e-5)  # non-contiguous weight
    xb = torch.randn(40).bfloat16()
    torch.testing.assert_close(fast_gemv(xb.float(), w, None), F.linear(xb.float(), w), rtol=1e-5, atol=1e-5)


def test_bf16_fast_decoding_with_fp32_cache_is_as_accurate_as_plain_bf16() -> None:
    """compile=True keeps a bf16 model's keys/values in an fp32 cache (exact: bf16 values are
    fp32 values), attends in fp32 and runs one-row linears through the fast GEMV. Teacher-forced
    over the same tokens, its step logits must be as close to an fp32 full recompute with the
    same (bf16-rounded) weights as the plain bf16 cached path is."""
    from anyformer.generation.fast import FastLinears
    from anyformer.models.presets import preset

    torch.manual_seed(0)
    cfg = preset("gpt2-tiny")
    model = build_model(cfg).eval().bfloat16()
    ref = build_model(cfg).eval()
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    tokens = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():
        want = ref(tokens).float()[0, 8:]  # (16, V)

        def cached(dtype: torch.dtype | None, fast: bool) -> Tensor:
            cache = model.make_cache(1, 24, dtype=dtype)
            model(tokens[:, :8], cache)
            rows = []
            with FastLinears(model) if fast else contextlib.nullcontext():
                for i in range(8, 24):
                    rows.append(model(tokens[:, i : i + 1], cache)[0, -1].float())
            return torch.stack(rows)

        plain_err = (cached(None, False) - want).abs().max()
        fast_err = (cached(torch.float32, True) - want).abs().max()
    assert fast_err <= 1.5 * plain_err + 1e-3, (fast_err, plain_err)
    assert fast_err < 0.05 * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_multi_gemv_equals_one_call_per_weight_for_any_thread_count(dtype: torch.dtype) -> None:
    """Several weights in one call give each weight's own product, bit for bit, and a row's value
    does not depend on how the rows are split between threads (each row is summed in one order)."""
    module = _native_or_skip()
    torch.manual_seed(3)
    k = 77
    ws = [torch.randn(o, k).to(dtype) for o in (5, 130, 64, 3)]
    bs = [torch.randn(w.shape[0]).to(dtype) for w in ws]
    x = torch.randn(k).to(dtype)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for biases in ([], bs):
                fused = module.gemv_multi(x, ws, biases)
                single = torch.cat([module.gemv(x, w, b if biases else None) for w, b in zip(ws, bs)])
                assert torch.equal(fused, single)
                results.append(fused)
        assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])
    finally:
        torch.set_num_threads(old)
    with pytest.raises(RuntimeError, match="one per weight"):
        module.gemv_multi(x, ws, bs[:2])
    with pytest.raises(RuntimeError, match="expected"):
        module.gemv_multi(x, [torch.randn(4, k + 1).to(dtype)], [])


class _QKV(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)


def test_sibling_layers_run_fused_and_stop_fusing_when_parts_go_unclaimed() -> None:
    _native_or_skip()
    torch.manual_seed(0)
    m = _QKV()
    x, mem = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    want = [F.linear(x, lay.weight, lay.bias) for lay in (m.q_proj, m.k_proj, m.v_proj)]
    with torch.no_grad(), FastLinears(m) as fast:
        group = fast.groups[id(m.q_proj)]
        got = [m.q_proj(x), m.k_proj(x), m.v_proj(x)]  # self-attention: one fused call serves all three
        assert not group.parts and group.enabled
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # cross-attention: k and v read another tensor, so the parts kept for x are never claimed
        q = m.q_proj(x)
        k = m.k_proj(mem)
        torch.testing.assert_close(q, want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, F.linear(mem, m.k_proj.weight, m.k_proj.bias), rtol=1e-5, atol=1e-5)
        m.q_proj(x)  # the next leader call finds the unclaimed part and turns fusing off
        assert not group.enabled
        torch.testing.assert_close(m.v_proj(x), want[2], rtol=1e-5, atol=1e-5)
    assert "forward" not in m.q_proj.__dict__


def test_compiled_encoder_decoder_generation_equals_plain_generation() -> None:
    """Cross-attention reads the cached memory keys/values: fused sibling calls must not change
    what an encoder-decoder generates."""
    from anyformer.models.presets import preset

    torch.manual_seed(0)
    model = build_model(preset("t5-tiny", ffn={"kind": "swiglu"}, attention={"num_heads": 4, "num_kv_heads": 2})).eval()
    src = torch.randint(2, 200, (1, 9))
    plain = generate(model, src, max_new_tokens=10, compile=False, decoder_start_token_id=0)
    fast = generate(model, src, max_new_tokens=10, compile=True, decoder_start_token_id=0)
    assert torch.equal(plain, fast)


def test_failed_native_build_is_remembered_across_processes(tmp_path, monkeypatch) -> None:
    """A kernel that fails to build warns once, leaves a marker, and a later process (a fresh
    module table) takes the PyTorch path without trying to build again or warning."""
    import warnings

    from torch.utils import cpp_extension

    from anyformer import native

    monkeypatch.setenv("ANYFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ANYFORMER_REQUIRE_NATIVE", raising=False)  # this test is about the lenient mode
    src = tmp_path / "broken.cpp"
    src.write_text("this is not C++\n")
    monkeypatch.setattr(native, "_MODULES", {})
    calls = []

    def failing_build(**kwargs):  # stands in for the compiler, which would fail on this source
        calls.append(kwargs["name"])
        raise RuntimeError("Error building extension 'broken'")

    monkeypatch.setattr(cpp_extension, "load", failing_build)
    with pytest.warns(UserWarning, match="delete it to retry"):
        assert native.load("anyformer_test_broken", str(src)) is None
    assert len(calls) == 1
    marker = native.failure_marker(calls[0])
    assert open(marker).read().startswith("RuntimeError")
    monkeypatch.setattr(native, "_MODULES", {})  # a new process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load("anyformer_test_broken", str(src)) is None
    assert len(calls) == 1  # not retried
    src.write_text("still not C++, but changed\n")  # a changed source is tried afresh
    monkeypatch.setattr(native, "_MODULES", {})
    with pytest.warns(UserWarning):
        assert native.load("anyformer_test_broken", str(src)) is None
    assert len(calls) == 2


def test_native_primitives_are_operators_that_torch_compile_traces_through() -> None:
    """gemv, gemv_multi and one-query attention are torch.ops.anyformer operators: PyTorch's
    own operator checks pass (schema, shapes on fake tensors, tracing), and a function using them
    compiles as one graph (fullgraph: no break at the C++ calls) with eager's result."""
    from torch.library import opcheck

    from anyformer.generation.fast import fast_gemv
    from anyformer.nn.attention.kernels import sdpa_attention
    from anyformer.nn.attention.native_kernels import native_softmax

    _native_or_skip()
    if native_softmax(torch.device("cpu"), torch.float32) is None:
        pytest.skip("the C++ attention kernels need a C++ toolchain and AVX-512")
    torch.manual_seed(0)
    x, w, b = torch.randn(48), torch.randn(40, 48), torch.randn(40)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    for op, args in ((torch.ops.anyformer.gemv.default, (x, w, b)),
                     (torch.ops.anyformer.gemv_multi.default, (x, [w, w[:7].contiguous()], [])),
                     (torch.ops.anyformer.decode_attention.default, (q, k, v, 0.25))):
        result = opcheck(op, args)
        assert all(status == "SUCCESS" for status in result.values()), result

    def step(x: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(fast_gemv(x * 2, w, b)), sdpa_attention(q * 2, k, v)

    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(x, q), step(x, q)):
        torch.testing.assert_close(got, want)
    plain = torch.softmax((q * 2) @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.25, -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(compiled(x, q)[1], plain, rtol=1e-5, atol=1e-5)


def test_rows_of_another_dtype_take_the_general_path_and_equal_linear() -> None:
    """The per-layer lean forward checks the input row each call: an fp32 row fed to bf16 layers
    goes through the general path (the product in fp32, in the row's dtype), and several rows
    through F.linear."""
    _native_or_skip()
    torch.manual_seed(0)
    m = _QKV().bfloat16()
    x32 = torch.randn(1, 1, 16)
    with torch.no_grad(), FastLinears(m):
        mixed = m.q_proj(x32)
        assert mixed.dtype == torch.float32
        torch.testing.assert_close(mixed, F.linear(x32, m.q_proj.weight.float(), m.q_proj.bias.float()), rtol=1e-5, atol=1e-5)
        rows = torch.randn(1, 3, 16).bfloat16()
        assert torch.equal(m.k_proj(rows), F.linear(rows, m.k_proj.weight, m.k_proj.bias))
        one = torch.randn(1, 1, 16).bfloat16()
        got = m.v_proj(one)
        want = (one.double() @ m.v_proj.weight.double().T + m.v_proj.bias.double()).bfloat16()
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-2, atol=1e-2)


def test_native_builds_are_keyed_by_content_not_by_checkout(tmp_path, monkeypatch) -> None:
    """Two checkouts of the same kernel source (and the header it includes) compile the same
    staged paths into the same build folder, so neither rebuilds the other's; a changed header
    is a new build."""
    from torch.utils import cpp_extension

    from anyformer import native

    monkeypatch.setenv("ANYFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ANYFORMER_REQUIRE_NATIVE", raising=False)
    builds = []

    def recording_build(**kwargs):  # stands in for the compiler: records what it was asked to compile, and where
        builds.append(kwargs)
        raise RuntimeError("not compiled in this test")

    monkeypatch.setattr(cpp_extension, "load", recording_build)
    for checkout in ("a", "b"):
        folder = tmp_path / checkout / "kernels"
        folder.mkdir(parents=True)
        (folder / "k.cpp").write_text('#include "k.h"\nint f() { return g(); }\n')
        (folder / "k.h").write_text("inline int g() { return 1; }\n")
        monkeypatch.setattr(native, "_MODULES", {})
        monkeypatch.setenv("ANYFORMER_CACHE", str(tmp_path / "cache"))
        for marker in (tmp_path / "cache" / "native").glob("*.failed"):
            marker.unlink()  # the recorded failure of the first checkout's (fake) build
        with pytest.warns(UserWarning):
            native.load("anyformer_test_k", str(folder / "k.cpp"))
    first, second = builds
    assert first["sources"] == second["sources"] and first["build_directory"] == second["build_directory"]
    assert first["name"] == second["name"]
    staged = Path(first["sources"][0])
    assert str(tmp_path / "cache") in str(staged) and (staged.parent / "k.h").read_text() == "inline int g() { return 1; }\n"
    (tmp_path / "b" / "kernels" / "k.h").write_text("inline int g() { return 2; }\n")
    monkeypatch.setattr(native, "_MODULES", {})
    with pytest.warns(UserWarning):
        native.load("anyformer_test_k", str(tmp_path / "b" / "kernels" / "k.cpp"))
    assert builds[2]["name"] != first["name"] and builds[2]["build_directory"] != first["build_directory"]


def test_a_build_lock_that_stays_times_out_with_a_message(tmp_path, monkeypatch) -> None:
    """A lock file left in a kernel's build folder (a build killed midway) is waited for up to
    ANYFORMER_NATIVE_LOCK_TIMEOUT seconds, then the PyTorch path is taken with a warning naming
    the file (an error with ANYFORMER_REQUIRE_NATIVE); nothing is compiled meanwhile."""
    import time

    from torch.utils import cpp_extension

    from anyformer import native

    monkeypatch.setenv("ANYFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ANYFORMER_NATIVE_LOCK_TIMEOUT", "0.3")
    monkeypatch.delenv("ANYFORMER_REQUIRE_NATIVE", raising=False)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: pytest.fail("built while the folder was locked"))
    src = tmp_path / "k.cpp"
    src.write_text("int f() { return 1; }\n")
    build_name = f"anyformer_test_locked_{native._fingerprint(str(src))}"
    _, build_dir = native.build_paths(str(src), build_name)
    lock = Path(build_dir) / "lock"
    lock.write_text("")
    monkeypatch.setattr(native, "_MODULES", {})
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match=f"locked for .* by {lock}.*delete that file"):
        assert native.load("anyformer_test_locked", str(src)) is None
    assert 0.25 < time.perf_counter() - t0 < 5
    monkeypatch.setenv("ANYFORMER_REQUIRE_NATIVE", "1")
    monkeypatch.setattr(native, "_MODULES", {})
    with pytest.raises(native.NativeKernelError, match="locked"):
        native.load("anyformer_test_locked", str(src))
