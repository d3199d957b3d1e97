// Batch-1 decoding on CPU: one-row linear layers that read each weight once (the decoding
// step itself is the model's Python modules; these are the primitives it calls).
//
// One-row linear layers: out = W x + b.
//
// At batch 1 a decoding step is a chain of matrix-vector products whose speed is set by how
// fast the weights stream from memory. Each output row is one contiguous dot product, so a
// thread walks its rows front to back (one sequential stream, which the hardware prefetcher
// follows best) and threads split the rows. bf16 weights use the AVX512-BF16 dot-product
// instruction (pairs of bf16 products summed into fp32 lanes); fp32 weights use AVX-512 FMA.
// Accumulation is fp32 in both, the bias is added in fp32, and the result is rounded once to
// the input's dtype, as F.linear does.
//
// Built at run time by anyformer.native; the AVX-512 code is compiled per function (target
// attributes), and `supported` tells the caller whether this CPU can run it.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>


namespace {

constexpr int64_t kRowsPerTask = 64;
// Weights are read once per token: prefetching them a few lines ahead with the non-temporal hint
// keeps them from evicting what the rest of the step needs from the caches (measured +3-10% tokens/s
// in GPT-2-small decoding over no prefetch; 256 bytes was best among 256-8192). 0 turns it off.
int64_t g_prefetch = 256;

inline void prefetch_nta(const void* p) {
  if (g_prefetch) _mm_prefetch(static_cast<const char*>(p) + g_prefetch, _MM_HINT_NTA);
}

__attribute__((target("avx512f,avx512bw,avx512bf16")))
float dot_bf16(const uint16_t* w, const uint16_t* x, int64_t k) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 64 <= k; j += 64) {
    prefetch_nta(w + j);
    prefetch_nta(w + j + 32);
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
    prefetch_nta(w + j);
    prefetch_nta(w + j + 16);
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

// Rows [r0, r1) of w (rows of k) into y[r], plus the bias b[r] (b may be null). One row at a
// time: a thread then reads its rows as one sequential stream, which streams from memory faster
// here than interleaving several rows (measured: 4 rows at once lost 10-40% on weights that do
// not fit in cache, the decoding case).
void rows_f32(const float* w, const float* x, const float* b, float* y, int64_t r0, int64_t r1, int64_t k) {
  for (int64_t r = r0; r < r1; ++r) y[r] = dot_f32(w + r * k, x, k) + (b ? b[r] : 0.f);
}

void rows_bf16(const uint16_t* w, const uint16_t* x, const c10::BFloat16* b, c10::BFloat16* y, int64_t r0, int64_t r1, int64_t k) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc = dot_bf16(w + r * k, x, k);
    if (b) acc += static_cast<float>(b[r]);
    y[r] = c10::BFloat16(acc);
  }
}

// One weight of a multi-weight product: its rows land at out[start : start + rows).
struct Segment {
  const void* w;
  const void* b;
  int64_t start, rows;
};

}  // namespace

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

// x (k,) contiguous; weights: (o_i, k) contiguous, all of x's dtype (float32 or bfloat16);
// biases: empty, or one (o_i,) per weight. Returns the products one after another, (sum o_i,),
// in x's dtype: several layers that read the same input (q, k and v; gate and up) run in one
// parallel pass, so the threads start once instead of once per layer.
torch::Tensor gemv_multi(const torch::Tensor& x, const std::vector<torch::Tensor>& weights, const std::vector<torch::Tensor>& biases) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "gemv: x must be one contiguous vector");
  TORCH_CHECK(!weights.empty(), "gemv: no weights");
  TORCH_CHECK(biases.empty() || biases.size() == weights.size(), "gemv: give no bias or one per weight");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, "gemv: float32 or bfloat16 only");
  const int64_t k = x.size(0);
  std::vector<Segment> segs;
  int64_t total = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == k, "gemv: weight ", i, " has shape ", w.sizes(), ", expected (o, ", k, ")");
    TORCH_CHECK(w.is_contiguous() && w.scalar_type() == x.scalar_type(), "gemv: weight ", i, " must be contiguous and of x's dtype");
    const void* b = nullptr;
    if (!biases.empty()) {
      const auto& bi = biases[i];
      TORCH_CHECK(bi.is_contiguous() && bi.numel() == w.size(0) && bi.scalar_type() == x.scalar_type(), "gemv: bad bias ", i);
      b = bi.data_ptr();
    }
    segs.push_back({w.data_ptr(), b, total, w.size(0)});
    total += w.size(0);
  }
  auto out = torch::empty({total}, x.options());
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  void* y = out.data_ptr();
  const void* xv = x.data_ptr();
  at::parallel_for(0, total, kRowsPerTask, [&](int64_t r0, int64_t r1) {
    for (const auto& s : segs) {
      const int64_t lo = std::max(r0, s.start), hi = std::min(r1, s.start + s.rows);
      if (lo >= hi) continue;
      if (bf16) {
        rows_bf16(static_cast<const uint16_t*>(s.w), static_cast<const uint16_t*>(xv), static_cast<const c10::BFloat16*>(s.b),
                  static_cast<c10::BFloat16*>(y) + s.start, lo - s.start, hi - s.start, k);
      } else {
        rows_f32(static_cast<const float*>(s.w), static_cast<const float*>(xv), static_cast<const float*>(s.b),
                 static_cast<float*>(y) + s.start, lo - s.start, hi - s.start, k);
      }
    }
  });
  return out;
}

// x (k,) contiguous, weight (o, k) contiguous, bias (o,) or None, all of one dtype (float32 or
// bfloat16); returns (o,) in that dtype.
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() == 1 && x.size(0) == weight.size(1), "gemv: shapes do not match");
  std::vector<torch::Tensor> biases;
  if (bias.has_value() && bias->defined()) biases.push_back(*bias);
  return gemv_multi(x, {weight}, biases);
}


void set_prefetch(int64_t bytes) { g_prefetch = bytes; }

// The primitives as PyTorch operators (torch.ops.anyformer.*), so that torch.compile traces
// through them (their shapes for tracing are registered in anyformer/native.py).
torch::Tensor gemv_op(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  return gemv(x, weight, bias);
}

torch::Tensor gemv_multi_op(const torch::Tensor& x, at::TensorList weights, at::TensorList biases) {
  return gemv_multi(x, weights.vec(), biases.vec());
}

TORCH_LIBRARY_FRAGMENT(anyformer, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("gemv_multi(Tensor x, Tensor[] weights, Tensor[] biases) -> Tensor");
}

TORCH_LIBRARY_IMPL(anyformer, CPU, m) {
  m.impl("gemv", &gemv_op);
  m.impl("gemv_multi", &gemv_multi_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_prefetch", &set_prefetch, "prefetch distance in bytes (0: off)");
  m.def("supported", &supported, "whether this CPU has AVX-512 with BF16 dot products");
  m.def("gemv", &gemv, "one-row linear layer", pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none());
  m.def("gemv_multi", &gemv_multi, "several one-row linear layers on the same input, outputs concatenated",
        pybind11::arg("x"), pybind11::arg("weights"), pybind11::arg("biases"));
}
