// One-row linear layers for CPU decoding: out = W x + b, reading each weight once.
//
// At batch 1 a decoding step is a chain of matrix-vector products whose speed is set by how
// fast the weights stream from memory. Each output row is one contiguous dot product, so a
// thread walks its rows front to back (one sequential stream, which the hardware prefetcher
// follows best) and threads split the rows. bf16 weights use the AVX512-BF16 dot-product
// instruction (pairs of bf16 products summed into fp32 lanes); fp32 weights use AVX-512 FMA.
// Accumulation is fp32 in both, the bias is added in fp32, and the result is rounded once to
// the input's dtype, as F.linear does.
//
// Built at run time by anyformer.generation.fast; the AVX-512 code is compiled per function
// (target attributes), and `supported` tells the caller whether this CPU can run it.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

namespace {

constexpr int64_t kRowsPerTask = 64;

__attribute__((target("avx512f,avx512bw,avx512bf16")))
float dot_bf16(const uint16_t* w, const uint16_t* x, int64_t k) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 64 <= k; j += 64) {
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + j), (__m512bh)_mm512_loadu_si512(x + j));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + j + 32), (__m512bh)_mm512_loadu_si512(x + j + 32));
  }
  for (; j < k; j += 32) {  // last one or two partial vectors, masked (masked-off lanes read as zero)
    const int64_t left = k - j;
    const __mmask32 m = left >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << left) - 1u);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, w + j), (__m512bh)_mm512_maskz_loadu_epi16(m, x + j));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

__attribute__((target("avx512f")))
float dot_f32(const float* w, const float* x, int64_t k) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= k; j += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), _mm512_loadu_ps(x + j), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 16), _mm512_loadu_ps(x + j + 16), a1);
  }
  for (; j < k; j += 16) {
    const int64_t left = k - j;
    const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + j), _mm512_maskz_loadu_ps(m, x + j), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

}  // namespace

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

// x (k,) contiguous, weight (o, k) contiguous, bias (o,) or None, all of one dtype (float32 or
// bfloat16); returns (o,) in that dtype.
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() == 1 && x.size(0) == weight.size(1), "gemv: shapes do not match");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "gemv: inputs must be contiguous");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "gemv: x and weight dtypes differ");
  const int64_t o = weight.size(0), k = weight.size(1);
  auto out = torch::empty({o}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == o && bias->scalar_type() == x.scalar_type(), "gemv: bad bias");
  }
  if (weight.scalar_type() == torch::kBFloat16) {
    const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
    const auto* xv = reinterpret_cast<const uint16_t*>(x.data_ptr());
    const auto* b = has_bias ? bias->data_ptr<c10::BFloat16>() : nullptr;
    auto* y = out.data_ptr<c10::BFloat16>();
    at::parallel_for(0, o, kRowsPerTask, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float acc = dot_bf16(w + r * k, xv, k);
        if (b) acc += static_cast<float>(b[r]);
        y[r] = c10::BFloat16(acc);
      }
    });
  } else {
    TORCH_CHECK(weight.scalar_type() == torch::kFloat, "gemv: float32 or bfloat16 only");
    const float* w = weight.data_ptr<float>();
    const float* xv = x.data_ptr<float>();
    const float* b = has_bias ? bias->data_ptr<float>() : nullptr;
    float* y = out.data_ptr<float>();
    at::parallel_for(0, o, kRowsPerTask, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) y[r] = dot_f32(w + r * k, xv, k) + (b ? b[r] : 0.f);
    });
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &supported, "whether this CPU has AVX-512 with BF16 dot products");
  m.def("gemv", &gemv, "one-row linear layer", pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none());
}
