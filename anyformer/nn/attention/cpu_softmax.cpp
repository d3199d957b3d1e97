// Online-softmax bookkeeping of the chunked attention kernel, one pass per block row.
//
// For each key block the chunked kernel turns a (rows, cols) block of base-2 logits into
// probabilities relative to a running row maximum: new max, p = exp2(s - max) in place, the row
// sum of p, and the factor alpha = exp2(old max - new max) that rescales what was accumulated
// before. In PyTorch that is nine passes over the block (amax, maximum, sub, exp2, sum, ...),
// each streaming the whole multi-megabyte block through the caches; here each row (a few KB)
// is read once for its max and once more, still in L1, for exp2 and the sum.
//
// exp2 and the one-query decoding attention live in cpu_one_query.h.
//
// Built at run time by anyformer.native; `supported` tells whether this CPU has AVX-512.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_one_query.h"

namespace {

using namespace anyformer_attention;

// One row: returns the new max, writes exp2(row - new max) over the row and its sum to *sum.
__attribute__((target("avx512f")))
float row_update(float* row, int64_t cols, float old_max, float* sum) {
  __m512 mx = _mm512_set1_ps(old_max);
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 m = tail_mask(cols - j);
    mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, row + j));
  }
  const float new_max = _mm512_reduce_max_ps(mx);
  const __m512 nm = _mm512_set1_ps(new_max);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 m = tail_mask(cols - j);
    const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), nm));
    _mm512_mask_storeu_ps(row + j, m, p);
    acc = _mm512_mask_add_ps(acc, m, acc, p);
  }
  *sum = _mm512_reduce_add_ps(acc);
  return new_max;
}

// One row: p = p * (dp - delta).
__attribute__((target("avx512f")))
void row_softmax_grad(float* p, const float* dp, int64_t cols, float delta) {
  const __m512 dl = _mm512_set1_ps(delta);
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 m = tail_mask(cols - j);
    const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dp + j), dl);
    _mm512_mask_storeu_ps(p + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + j), g));
  }
}

void check_rows(const torch::Tensor& s, const torch::Tensor& v, const char* what) {
  TORCH_CHECK(v.scalar_type() == torch::kFloat && v.is_contiguous(), what, " must be contiguous float32");
  TORCH_CHECK(v.numel() * s.size(-1) == s.numel(), what, " needs one value per row of the block");
}

}  // namespace

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

// s: contiguous float32 block, rows along the last dim; row_max, row_sum: one float32 per row
// (updated in place). Overwrites s with exp2(s - new max) and returns alpha (one per row),
// the factor exp2(old max - new max) for what was accumulated before this block.
torch::Tensor online_softmax_(torch::Tensor s, torch::Tensor row_max, torch::Tensor row_sum) {
  TORCH_CHECK(s.scalar_type() == torch::kFloat && s.is_contiguous() && s.dim() >= 1, "online_softmax_: s must be contiguous float32");
  check_rows(s, row_max, "row_max");
  check_rows(s, row_sum, "row_sum");
  const int64_t cols = s.size(-1), rows = s.numel() / std::max<int64_t>(cols, 1);
  auto alpha = torch::empty_like(row_max);
  float* sp = s.data_ptr<float>();
  float* mp = row_max.data_ptr<float>();
  float* lp = row_sum.data_ptr<float>();
  float* ap = alpha.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float sum = 0.f;
      const float old = mp[r];
      const float now = row_update(sp + r * cols, cols, old, &sum);
      const float a = old == now ? 1.f : std::exp2(old - now);
      ap[r] = a;
      lp[r] = lp[r] * a + sum;
      mp[r] = now;
    }
  });
  return alpha;
}

// s: contiguous float32 block; shift: one float32 per row. s = exp2(s - shift) in place (the
// backward pass's probabilities from the saved log-sum-exp).
void exp2_shift_(torch::Tensor s, const torch::Tensor& shift) {
  TORCH_CHECK(s.scalar_type() == torch::kFloat && s.is_contiguous() && s.dim() >= 1, "exp2_shift_: s must be contiguous float32");
  check_rows(s, shift, "shift");
  const int64_t cols = s.size(-1), rows = s.numel() / std::max<int64_t>(cols, 1);
  float* sp = s.data_ptr<float>();
  const float* hp = shift.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_exp2_shift(sp + r * cols, cols, hp[r]);
  });
}

// p, dp: contiguous float32 blocks of one shape; delta: one float32 per row. p = p * (dp - delta)
// in place: the logits' gradient of a softmax block (delta = rowsum(dout * out)).
void softmax_grad_(torch::Tensor p, const torch::Tensor& dp, const torch::Tensor& delta) {
  TORCH_CHECK(p.scalar_type() == torch::kFloat && p.is_contiguous() && p.dim() >= 1, "softmax_grad_: p must be contiguous float32");
  TORCH_CHECK(dp.scalar_type() == torch::kFloat && dp.is_contiguous() && dp.sizes() == p.sizes(), "softmax_grad_: dp must match p");
  check_rows(p, delta, "delta");
  const int64_t cols = p.size(-1), rows = p.numel() / std::max<int64_t>(cols, 1);
  float* pp = p.data_ptr<float>();
  const float* gp = dp.data_ptr<float>();
  const float* dl = delta.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_softmax_grad(pp + r * cols, gp + r * cols, cols, dl[r]);
  });
}

// One query per row (cached decoding, nothing masked): q (b, h, 1, d), k and v (b, g, m, d) with
// h a multiple of g (grouped-query heads share their group's keys) and unit stride along d, any
// other strides (slices of a preallocated cache). Returns softmax(scale q k^T) v, (b, h, 1, d).
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "decode_attention: q (b, h, 1, d), k/v (b, g, m, d)");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat,
              "decode_attention: float32 only");
  const int64_t b = q.size(0), h = q.size(1), d = q.size(3), g = k.size(1), m = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == b && k.size(3) == d && g > 0 && h % g == 0 && m > 0,
              "decode_attention: shapes do not match");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v need unit stride along the head dim");
  const auto qc = q.contiguous();
  auto out = torch::empty({b, h, 1, d}, q.options());
  const float c = static_cast<float>(scale * 1.4426950408889634);
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t r = h / g;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, m * d));  // threads only for long caches
  at::parallel_for(0, b * h, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(m);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bi = i / h, hi = i % h, gi = hi / r;
      one_query(qp + i * d, kp + bi * k.stride(0) + gi * k.stride(1), vp + bi * v.stride(0) + gi * v.stride(1), op + i * d,
                buf.data(), m, d, k.stride(2), v.stride(2), c);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "one-query attention over a cache (no mask)");
  m.def("softmax_grad_", &softmax_grad_, "p = p * (dp - delta) per row, in place");
  m.def("supported", &supported, "whether this CPU has AVX-512");
  m.def("online_softmax_", &online_softmax_, "one key block's online-softmax update, in place; returns alpha");
  m.def("exp2_shift_", &exp2_shift_, "s = exp2(s - shift) per row, in place");
}
