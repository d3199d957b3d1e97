"""A C++ kernel that does not build: a warning and the PyTorch path normally; an error when
ANYFORMER_REQUIRE_NATIVE is set (as the CI script sets it), so the suite cannot go green by
skipping its native tests."""

from __future__ import annotations

import warnings

import pytest

from anyformer import native


def test_a_broken_kernel_warns_normally_and_fails_when_native_kernels_are_required(tmp_path, monkeypatch) -> None:
    source = tmp_path / "broken_probe.cpp"
    source.write_text("int broken( {\n")  # does not compile
    monkeypatch.setenv("ANYFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ANYFORMER_NO_NATIVE", raising=False)
    monkeypatch.delenv("ANYFORMER_REQUIRE_NATIVE", raising=False)
    monkeypatch.setattr(native, "_MODULES", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.load("broken_probe", str(source)) is None
    assert any("broken_probe unavailable" in str(w.message) for w in caught)
    # the failure is remembered; with the requirement set, it is retried and raises
    monkeypatch.setattr(native, "_MODULES", {})
    monkeypatch.setenv("ANYFORMER_REQUIRE_NATIVE", "1")
    with pytest.raises(native.NativeKernelError, match="broken_probe .* failed to build and ANYFORMER_REQUIRE_NATIVE is set"):
        native.load("broken_probe", str(source))
