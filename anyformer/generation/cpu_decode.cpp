// Batch-1 decoding on CPU: one-row linear layers that read each weight once, and a whole
// decoder step (every block, the final norm and the LM head) in one call.
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
// The decoder step (class Decoder) replaces ~25 Python-level calls per block with C++: norms,
// activations, residual additions and rotary embedding through the same ATen functions the
// library's modules call, in the same order and dtypes (so it computes what the Python step
// computes, bit for bit), the projections through the GEMV below, and attention through the
// one-query kernel shared with the attention kernels (cpu_one_query.h).
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

#include "../nn/attention/cpu_one_query.h"

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


namespace {

bool given(const torch::Tensor& t) { return t.defined() && t.numel() > 0; }

std::vector<torch::Tensor> present(std::initializer_list<torch::Tensor> ts) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts)
    if (given(t)) out.push_back(t);
  return out;
}

// A norm as anyformer.nn.norm computes it. kind 0: identity, 1: LayerNorm (weights in x's dtype:
// one layer_norm call), 2: RMSNorm (fp32 statistics, weight applied in fp32, cast back).
struct Norm {
  int64_t kind = 0;
  double eps = 0.0;
  torch::Tensor w, b;

  torch::Tensor operator()(const torch::Tensor& x) const {
    if (kind == 1) return at::layer_norm(x, {x.size(-1)}, w, given(b) ? c10::optional<torch::Tensor>(b) : c10::nullopt, eps);
    if (kind == 2) {
      const auto xf = x.to(torch::kFloat);
      const auto y = xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps);
      return (w.to(torch::kFloat) * y).to(x.scalar_type());
    }
    return x;
  }
};

struct Block {
  Norm norm1, norm2;
  torch::Tensor wq, wk, wv, bq, bk, bv, wo, bo;
  torch::Tensor w_gate, b_gate, w_up, b_up, w_down, b_down;  // w_gate undefined: plain MLP
  torch::Tensor k_cache, v_cache;                            // (1, g, L, d)
};

// Activations by index, as anyformer.nn.feedforward.ACTIVATIONS: gelu, gelu_tanh, relu, silu.
torch::Tensor activate(const torch::Tensor& x, int64_t act) {
  switch (act) {
    case 0: return at::gelu(x);
    case 1: return at::gelu(x, "tanh");
    case 2: return at::relu(x);
    default: return at::silu(x);
  }
}

}  // namespace

// A decoder-only model's one-token step at batch 1 (pre-norm blocks, exact attention over a
// preallocated cache, MLP or gated feed-forward, final norm, LM head), built once per cache.
class Decoder {
 public:
  // blocks: per block 20 tensors, an empty tensor where a part is absent: norm1 weight, bias;
  // q, k, v weights; q, k, v biases; out weight, bias; norm2 weight, bias; gate weight, bias;
  // up weight, bias; down weight, bias; key cache, value cache (1, g, L, d).
  // norms: per block (norm1 kind, eps, norm2 kind, eps); final: (kind, eps) of the final norm.
  Decoder(const std::vector<std::vector<torch::Tensor>>& blocks, const std::vector<std::vector<double>>& norms,
          const std::vector<torch::Tensor>& final_norm, std::vector<double> final_meta, torch::Tensor head,
          double head_scale, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale, int64_t act,
          int64_t rotary_dim, bool interleaved)
      : head_(std::move(head)), head_scale_(head_scale), h_(num_heads), g_(num_kv_heads), d_(head_dim), scale_(scale),
        act_(act), rotary_dim_(rotary_dim), interleaved_(interleaved) {
    TORCH_CHECK(blocks.size() == norms.size() && !blocks.empty(), "Decoder: one norms entry per block");
    TORCH_CHECK(h_ > 0 && g_ > 0 && h_ % g_ == 0 && d_ > 0, "Decoder: bad head counts");
    TORCH_CHECK(rotary_dim_ % 2 == 0 && rotary_dim_ <= d_, "Decoder: rotary_dim must be even and at most head_dim");
    for (size_t i = 0; i < blocks.size(); ++i) {
      const auto& t = blocks[i];
      TORCH_CHECK(t.size() == 20 && norms[i].size() == 4, "Decoder: block ", i, " needs 20 tensors and 4 norm values");
      Block b;
      b.norm1 = Norm{static_cast<int64_t>(norms[i][0]), norms[i][1], t[0], t[1]};
      b.wq = t[2], b.wk = t[3], b.wv = t[4], b.bq = t[5], b.bk = t[6], b.bv = t[7], b.wo = t[8], b.bo = t[9];
      b.norm2 = Norm{static_cast<int64_t>(norms[i][2]), norms[i][3], t[10], t[11]};
      b.w_gate = t[12], b.b_gate = t[13], b.w_up = t[14], b.b_up = t[15], b.w_down = t[16], b.b_down = t[17];
      b.k_cache = t[18], b.v_cache = t[19];
      TORCH_CHECK(b.k_cache.dim() == 4 && b.k_cache.size(0) == 1 && b.k_cache.size(1) == g_ && b.k_cache.size(3) == d_ &&
                      b.k_cache.sizes() == b.v_cache.sizes() && b.k_cache.is_contiguous() && b.v_cache.is_contiguous() &&
                      b.k_cache.scalar_type() == torch::kFloat && b.v_cache.scalar_type() == torch::kFloat,
                  "Decoder: block ", i, ": caches must be contiguous float32 (1, ", g_, ", L, ", d_, ")");
      blocks_.push_back(std::move(b));
    }
    TORCH_CHECK(final_norm.size() == 2 && final_meta.size() == 2, "Decoder: final norm needs (weight, bias) and (kind, eps)");
    final_ = Norm{static_cast<int64_t>(final_meta[0]), final_meta[1], final_norm[0], final_norm[1]};
  }

  // x: the embedded token (dim,) in the model's dtype; pos: the cache slot it fills (keys
  // 0..pos are attended); cos, sin: (rotary_dim,) fp32 angles of its position (empty
  // without rotary embedding). Returns the logits (V,) in the model's dtype.
  torch::Tensor step(torch::Tensor x, int64_t pos, const torch::Tensor& cos, const torch::Tensor& sin) {
    const int64_t L = blocks_[0].k_cache.size(2);
    TORCH_CHECK(pos >= 0 && pos < L, "Decoder: position ", pos, " is outside the cache (", L, " slots)");
    TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "Decoder: x must be one contiguous vector");
    for (auto& b : blocks_) {
      x = x + attention(b, b.norm1(x), pos, cos, sin);
      x = x + feed_forward(b, b.norm2(x));
    }
    x = final_(x);
    if (head_scale_ != 1.0) x = x * head_scale_;
    return gemv_multi(x.contiguous(), {head_}, {});
  }

 private:
  // Rotary embedding of the first rotary_dim channels of (heads, d), in fp32, as
  // anyformer.nn.positional.rope.apply_rope.
  torch::Tensor rotate(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) const {
    const int64_t r = rotary_dim_;
    const auto rot = x.slice(-1, 0, r).to(torch::kFloat);
    torch::Tensor out;
    if (interleaved_) {
      const auto pairs = rot.unflatten(-1, {-1, 2});  // (heads, r/2, 2)
      const auto c = cos.slice(-1, 0, r / 2).unsqueeze(-1), s = sin.slice(-1, 0, r / 2).unsqueeze(-1);
      const auto x1 = pairs.slice(-1, 0, 1), x2 = pairs.slice(-1, 1, 2);
      out = at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1).flatten(-2);
    } else {
      const auto x1 = rot.slice(-1, 0, r / 2), x2 = rot.slice(-1, r / 2, r);
      out = rot * cos + at::cat({-x2, x1}, -1) * sin;
    }
    return at::cat({out.to(x.scalar_type()), x.slice(-1, r)}, -1);
  }

  torch::Tensor attention(Block& b, const torch::Tensor& x, int64_t pos, const torch::Tensor& cos, const torch::Tensor& sin) {
    const auto qkv = gemv_multi(x, {b.wq, b.wk, b.wv}, present({b.bq, b.bk, b.bv}));
    auto q = qkv.slice(0, 0, h_ * d_).view({h_, d_});
    auto k = qkv.slice(0, h_ * d_, (h_ + g_) * d_).view({g_, d_});
    const auto v = qkv.slice(0, (h_ + g_) * d_).view({g_, d_});
    if (rotary_dim_ > 0) {
      q = rotate(q, cos, sin);
      k = rotate(k, cos, sin);
    }
    b.k_cache.select(0, 0).select(1, pos).copy_(k);
    b.v_cache.select(0, 0).select(1, pos).copy_(v);
    const auto qf = q.to(torch::kFloat).contiguous();
    auto out = torch::empty({h_, d_}, qf.options());
    const int64_t m = pos + 1, L = b.k_cache.size(2), r = h_ / g_;
    const float c = static_cast<float>(scale_ * 1.4426950408889634);
    const float* qp = qf.data_ptr<float>();
    const float* kp = b.k_cache.data_ptr<float>();
    const float* vp = b.v_cache.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, m * d_));  // threads only for long caches
    at::parallel_for(0, h_, grain, [&](int64_t i0, int64_t i1) {
      std::vector<float> buf(m);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t gi = i / r;
        anyformer_attention::one_query(qp + i * d_, kp + gi * L * d_, vp + gi * L * d_, op + i * d_, buf.data(), m, d_, d_, d_, c);
      }
    });
    return gemv_multi(out.view({h_ * d_}).to(x.scalar_type()), {b.wo}, present({b.bo}));
  }

  torch::Tensor feed_forward(const Block& b, const torch::Tensor& x) const {
    torch::Tensor hidden;
    if (given(b.w_gate)) {
      const auto gu = gemv_multi(x, {b.w_gate, b.w_up}, present({b.b_gate, b.b_up}));
      const int64_t f = b.w_gate.size(0);
      hidden = activate(gu.slice(0, 0, f), act_) * gu.slice(0, f);
    } else {
      hidden = activate(gemv_multi(x, {b.w_up}, present({b.b_up})), act_);
    }
    return gemv_multi(hidden.contiguous(), {b.w_down}, present({b.b_down}));
  }

  std::vector<Block> blocks_;
  Norm final_;
  torch::Tensor head_;
  double head_scale_;
  int64_t h_, g_, d_;
  double scale_;
  int64_t act_, rotary_dim_;
  bool interleaved_;
};

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
  pybind11::class_<Decoder>(m, "Decoder", "a decoder-only model's batch-1 step over a preallocated cache")
      .def(pybind11::init<const std::vector<std::vector<torch::Tensor>>&, const std::vector<std::vector<double>>&,
                          const std::vector<torch::Tensor>&, std::vector<double>, torch::Tensor, double, int64_t, int64_t,
                          int64_t, double, int64_t, int64_t, bool>())
      .def("step", &Decoder::step, "logits of one token; writes its keys/values at cache slot pos");
  m.def("set_prefetch", &set_prefetch, "prefetch distance in bytes (0: off)");
  m.def("supported", &supported, "whether this CPU has AVX-512 with BF16 dot products");
  m.def("gemv", &gemv, "one-row linear layer", pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none());
  m.def("gemv_multi", &gemv_multi, "several one-row linear layers on the same input, outputs concatenated",
        pybind11::arg("x"), pybind11::arg("weights"), pybind11::arg("biases"));
}
