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

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
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

// ALiBi's slopes (h,) as a pointer, or null when `slopes` is empty.
const float* alibi_slopes(const torch::Tensor& slopes, int64_t h) {
  if (slopes.numel() == 0) return nullptr;
  TORCH_CHECK(slopes.scalar_type() == torch::kFloat && slopes.is_contiguous() && slopes.numel() == h,
              "chunked attention: ALiBi slopes must be (h,) contiguous float32");
  return slopes.data_ptr<float>();
}

// One row of base-2 logits += -slope * |dist0 - j| * log2(e) for its keys j = 0..cols-1
// (dist0: the query's position minus the block's first key's).
__attribute__((target("avx512f")))
void add_alibi(float* row, int64_t cols, float slope, int64_t dist0) {
  const __m512 coef = _mm512_set1_ps(-slope * 1.4426950408889634f);
  const __m512 step = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 m = tail_mask(cols - j);
    const __m512 dist = _mm512_abs_ps(_mm512_sub_ps(_mm512_set1_ps(static_cast<float>(dist0 - j)), step));
    _mm512_mask_storeu_ps(row + j, m, _mm512_fmadd_ps(coef, dist, _mm512_maskz_loadu_ps(m, row + j)));
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


// The whole forward of exact attention (plain or causal, no mask or bias), FlashAttention-style:
// q (b, h, n, d), k and v (b, g, m, d), all contiguous float32, h a multiple of g. One task per
// (key/value group, query block): its r = h / g heads' query rows stacked, walked over the key
// blocks the causal limit leaves (query i sees keys j <= i + m - n), with the online softmax
// kept per row. Tasks go to the threads from a shared counter, costliest first, and each task's
// matrix products run single-threaded inside it: one parallel region per call instead of three
// per block, so a thread that is slow for a while (a busy host) delays only its own tasks.
// slopes: empty, or ALiBi's (h,) slopes: logits get -slope * |i + delta - j| for query i and key
// j (delta: the first query's position minus the first key's), generated per block.
// Returns the output (b, h, n, d) and the base-2 log-sum-exp (b, h, n, 1) (+inf, output 0, for
// a row with no visible key), as the PyTorch forward in chunked.py.
std::vector<torch::Tensor> chunked_forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale,
                                           bool causal, int64_t q_block, int64_t k_block, const torch::Tensor& slopes,
                                           int64_t delta) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes(), "chunked_forward: q (b, h, n, d), k/v (b, g, m, d)");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous(), "chunked_forward: contiguous float32 inputs only");
  const int64_t b = q.size(0), h = q.size(1), n = q.size(2), d = q.size(3), g = k.size(1), m = k.size(2);
  TORCH_CHECK(k.size(0) == b && k.size(3) == d && g > 0 && h % g == 0, "chunked_forward: shapes do not match");
  TORCH_CHECK(q_block > 0 && k_block > 0, "chunked_forward: block sizes must be positive");
  const int64_t r = h / g, off = m - n, blocks = (n + q_block - 1) / q_block;
  const float* sl = alibi_slopes(slopes, h);
  auto out = torch::zeros({b, h, n, d}, q.options());
  auto lse = torch::empty({b, h, n, 1}, q.options());
  const float c = static_cast<float>(scale * 1.4426950408889634);
  // tasks (group, query block), the ones with the most key blocks first
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t qi = blocks - 1; qi >= 0; --qi)
    for (int64_t bg = 0; bg < b * g; ++bg) tasks.emplace_back(bg, qi);
  if (!causal) std::reverse(tasks.begin(), tasks.end());
  std::atomic<int64_t> next{0};
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size())));
  const auto kd = k.detach(), vd = v.detach();  // plain arrays here; gradients come from chunked.py's backward
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    if (w0 >= w1) return;
    at::NoGradGuard no_grad;  // grad mode is per thread: the pool's threads have their own
    const int64_t most = r * std::min(q_block, n);
    auto qt_buf = torch::empty({most * d}, q.options());
    auto s_buf = torch::empty({most * std::min(k_block, m)}, q.options());
    auto acc_buf = torch::empty({most * d}, q.options());
    std::vector<float> row_max(most), row_sum(most);
    for (int64_t t = next++; t < static_cast<int64_t>(tasks.size()); t = next++) {
      const int64_t bg = tasks[t].first, q0 = tasks[t].second * q_block, q1 = std::min(q0 + q_block, n), bn = q1 - q0;
      const int64_t bi = bg / g, gi = bg % g, rows = r * bn;
      const auto qt = qt_buf.narrow(0, 0, rows * d).view({rows, d});
      const auto acc = acc_buf.narrow(0, 0, rows * d).view({rows, d});
      float* qtp = qt.data_ptr<float>();
      for (int64_t hh = 0; hh < r; ++hh)  // the group's heads stacked: row hh * bn + i is head gi*r+hh, query q0+i
        for (int64_t i = 0; i < bn; ++i) {
          const float* src = qp + (((bi * h + gi * r + hh) * n) + q0 + i) * d;
          float* dst = qtp + (hh * bn + i) * d;
          for (int64_t j = 0; j < d; ++j) dst[j] = src[j] * c;
        }
      acc.zero_();
      std::fill(row_max.begin(), row_max.begin() + rows, std::numeric_limits<float>::lowest());
      std::fill(row_sum.begin(), row_sum.begin() + rows, 0.f);
      const int64_t k_end = causal ? std::min(m, q1 + off) : m;
      const auto kg = kd[bi][gi], vg = vd[bi][gi];  // (m, d)
      for (int64_t k0 = 0; k0 < k_end; k0 += k_block) {
        const int64_t k1 = std::min(k0 + k_block, k_end), bm = k1 - k0;
        auto s = s_buf.narrow(0, 0, rows * bm).view({rows, bm});
        at::mm_out(s, qt, kg.narrow(0, k0, bm).t());
        float* sp = s.data_ptr<float>();
        const bool partial = causal && k1 - 1 > q0 + off;
        for (int64_t row = 0; row < rows; ++row) {
          float* srow = sp + row * bm;
          if (sl) add_alibi(srow, bm, sl[gi * r + row / bn], delta + q0 + row % bn - k0);
          if (partial) {  // keys past this query's position are hidden
            const int64_t seen = std::max<int64_t>(0, std::min(bm, q0 + row % bn + off + 1 - k0));
            std::fill(srow + seen, srow + bm, -INFINITY);
          }
          float sum = 0.f;
          const float old = row_max[row];
          const float now = row_update(srow, bm, old, &sum);
          const float a = old == now ? 1.f : std::exp2(old - now);
          row_sum[row] = row_sum[row] * a + sum;
          row_max[row] = now;
          if (a != 1.f) {
            float* arow = acc.data_ptr<float>() + row * d;
            for (int64_t j = 0; j < d; ++j) arow[j] *= a;
          }
        }
        acc.addmm_(s, vg.narrow(0, k0, bm));
      }
      const float* ap = acc.data_ptr<float>();
      for (int64_t hh = 0; hh < r; ++hh)
        for (int64_t i = 0; i < bn; ++i) {
          const int64_t row = hh * bn + i, qrow = ((bi * h + gi * r + hh) * n) + q0 + i;
          if (row_sum[row] == 0.f) {  // no visible key: output stays 0
            lp[qrow] = INFINITY;
            continue;
          }
          const float inv = 1.f / row_sum[row];
          for (int64_t j = 0; j < d; ++j) op[qrow * d + j] = ap[row * d + j] * inv;
          lp[qrow] = row_max[row] + std::log2(row_sum[row]);
        }
    }
  });
  return {out, lse};
}

// The backward of chunked_forward, FlashAttention-2-style: one task per (key/value group, key
// block), walking the query blocks that see it. Each block's probabilities are recomputed from
// q, k and the saved log-sum-exp; the task accumulates its keys' and values' gradients alone,
// and the queries' gradients go to a per-thread buffer (summed at the end: O(n) memory per
// thread, no two threads ever write the same row). dout: (b, h, n, d); delta: rowsum(dout * out)
// (b, h, n, 1); slopes and offset: the forward's ALiBi slopes and delta. Returns dq, dk, dv.
std::vector<torch::Tensor> chunked_backward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                            const torch::Tensor& lse, const torch::Tensor& dout, const torch::Tensor& delta,
                                            double scale, bool causal, int64_t q_block, int64_t k_block,
                                            const torch::Tensor& slopes, int64_t offset) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes() && dout.sizes() == q.sizes(),
              "chunked_backward: q/dout (b, h, n, d), k/v (b, g, m, d)");
  for (const auto* t : {&q, &k, &v, &lse, &dout, &delta})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous(), "chunked_backward: contiguous float32 inputs only");
  const int64_t b = q.size(0), h = q.size(1), n = q.size(2), d = q.size(3), g = k.size(1), m = k.size(2);
  TORCH_CHECK(k.size(0) == b && k.size(3) == d && g > 0 && h % g == 0 && lse.numel() == b * h * n && delta.numel() == b * h * n,
              "chunked_backward: shapes do not match");
  TORCH_CHECK(q_block > 0 && k_block > 0, "chunked_backward: block sizes must be positive");
  const int64_t r = h / g, off = m - n, kblocks = (m + k_block - 1) / k_block;
  const float* sl = alibi_slopes(slopes, h);
  const float c = static_cast<float>(scale * 1.4426950408889634);
  auto dk = torch::empty({b, g, m, d}, q.options());
  auto dv = torch::empty({b, g, m, d}, q.options());
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (group, key block), the ones seen by the most queries first
  for (int64_t kj = 0; kj < kblocks; ++kj)
    for (int64_t bg = 0; bg < b * g; ++bg) tasks.emplace_back(bg, kj);
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size())));
  std::vector<torch::Tensor> dq_parts(workers);
  const auto qd = q.detach(), kd = k.detach(), vd = v.detach(), dod = dout.detach();
  const float* qp = qd.data_ptr<float>();
  const float* dop = dod.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  const float* dlp = delta.data_ptr<float>();
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    if (w0 >= w1) return;
    at::NoGradGuard no_grad;
    auto dq_part = torch::zeros({b, h, n, d}, q.options());
    float* dqp = dq_part.data_ptr<float>();
    const int64_t most = r * std::min(q_block, n), widest = std::min(k_block, m);
    auto qt = torch::empty({most * d}, q.options()), dot = torch::empty({most * d}, q.options());
    auto p_buf = torch::empty({most * widest}, q.options()), dp_buf = torch::empty({most * widest}, q.options());
    auto dq_tmp = torch::empty({most * d}, q.options());
    std::vector<float> row_lse(most), row_delta(most);
    for (int64_t t = next++; t < static_cast<int64_t>(tasks.size()); t = next++) {
      const int64_t bg = tasks[t].first, k0 = tasks[t].second * k_block, k1 = std::min(k0 + k_block, m), bm = k1 - k0;
      const int64_t bi = bg / g, gi = bg % g;
      const auto kb = kd[bi][gi].narrow(0, k0, bm), vb = vd[bi][gi].narrow(0, k0, bm);  // (bm, d)
      auto dkb = dk[bi][gi].narrow(0, k0, bm), dvb = dv[bi][gi].narrow(0, k0, bm);
      dkb.zero_();
      dvb.zero_();
      // causal: query i sees key k0 when i + off >= k0
      const int64_t first_q = causal ? std::max<int64_t>(0, k0 - off) : 0;
      for (int64_t q0 = (first_q / q_block) * q_block; q0 < n; q0 += q_block) {
        const int64_t q1 = std::min(q0 + q_block, n), bn = q1 - q0, rows = r * bn;
        const auto qg = qt.narrow(0, 0, rows * d).view({rows, d});
        const auto dog = dot.narrow(0, 0, rows * d).view({rows, d});
        float* qgp = qg.data_ptr<float>();
        float* dogp = dog.data_ptr<float>();
        for (int64_t hh = 0; hh < r; ++hh)
          for (int64_t i = 0; i < bn; ++i) {
            const int64_t row = hh * bn + i, src = ((bi * h + gi * r + hh) * n) + q0 + i;
            for (int64_t j = 0; j < d; ++j) qgp[row * d + j] = qp[src * d + j] * c;
            std::copy(dop + src * d, dop + (src + 1) * d, dogp + row * d);
            row_lse[row] = lp[src];
            row_delta[row] = dlp[src];
          }
        auto p = p_buf.narrow(0, 0, rows * bm).view({rows, bm});
        at::mm_out(p, qg, kb.t());  // base-2 logits
        float* pp = p.data_ptr<float>();
        const bool partial = causal && k1 - 1 > q0 + off;
        for (int64_t row = 0; row < rows; ++row) {
          float* prow = pp + row * bm;
          if (sl) add_alibi(prow, bm, sl[gi * r + row / bn], offset + q0 + row % bn - k0);
          if (partial) {
            const int64_t seen = std::max<int64_t>(0, std::min(bm, q0 + row % bn + off + 1 - k0));
            std::fill(prow + seen, prow + bm, -INFINITY);
          }
          row_exp2_shift(prow, bm, row_lse[row]);  // probabilities
        }
        dvb.addmm_(p.t(), dog);
        auto dp = dp_buf.narrow(0, 0, rows * bm).view({rows, bm});
        at::mm_out(dp, dog, vb.t());
        const float* dpp = dp.data_ptr<float>();
        for (int64_t row = 0; row < rows; ++row) row_softmax_grad(pp + row * bm, dpp + row * bm, bm, row_delta[row]);
        dkb.addmm_(p.t(), qg);  // p now holds the logits' gradient (base 2)
        auto dqt = dq_tmp.narrow(0, 0, rows * d).view({rows, d});
        at::mm_out(dqt, p, kb);
        const float* dqtp = dqt.data_ptr<float>();
        for (int64_t hh = 0; hh < r; ++hh)
          for (int64_t i = 0; i < bn; ++i) {
            const int64_t row = hh * bn + i, dst = ((bi * h + gi * r + hh) * n) + q0 + i;
            for (int64_t j = 0; j < d; ++j) dqp[dst * d + j] += dqtp[row * d + j];
          }
      }
      dkb.mul_(1.0 / 1.4426950408889634);  // the queries it was multiplied with carried log2(e)
    }
    dq_parts[w0] = dq_part;
  });
  auto dq = dq_parts[0];
  for (int64_t w = 1; w < workers; ++w)
    if (dq_parts[w].defined()) dq.add_(dq_parts[w]);
  dq.mul_(scale);
  return {dq, dk, dv};
}

// One-query attention as a PyTorch operator (torch.ops.anyformer.decode_attention), so that
// torch.compile traces through it (its shape for tracing is registered in anyformer/native.py).
TORCH_LIBRARY_FRAGMENT(anyformer, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(anyformer, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("chunked_backward", &chunked_backward, "the gradients (dq, dk, dv) of chunked_forward");
  m.def("chunked_forward", &chunked_forward, "exact attention forward, plain or causal: (out, base-2 lse)");
  m.def("decode_attention", &decode_attention, "one-query attention over a cache (no mask)");
  m.def("softmax_grad_", &softmax_grad_, "p = p * (dp - delta) per row, in place");
  m.def("supported", &supported, "whether this CPU has AVX-512");
  m.def("online_softmax_", &online_softmax_, "one key block's online-softmax update, in place; returns alpha");
  m.def("exp2_shift_", &exp2_shift_, "s = exp2(s - shift) per row, in place");
}
