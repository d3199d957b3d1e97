// One-query attention over a key/value cache, and the exp2 it needs, shared by the C++ kernels
// of the chunked attention (cpu_softmax.cpp) and of cached decoding (generation/cpu_decode.cpp).
//
// exp2 is evaluated as 2^floor(x) * p(frac(x)), p a degree-6 polynomial fitted to 2^f on [0, 1]
// for minimal relative error (at most ~1.1e-7 in fp32 arithmetic, below fp32's epsilon);
// arguments are clamped at -160 (2^-160 rounds to 0) so that masked logits (-inf) give exactly 0.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace anyformer_attention {

__attribute__((target("avx512f")))
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-160.f));
  const __m512 xi = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, xi);  // in [0, 1)
  __m512 p = _mm512_set1_ps(2.170224616e-04f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.243969076e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.678840637e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.548334122e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402298301e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931470037e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, xi);
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

// One row: row = exp2(row - shift) in place.
__attribute__((target("avx512f")))
inline void row_exp2_shift(float* row, int64_t cols, float shift) {
  const __m512 s = _mm512_set1_ps(shift);
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 m = tail_mask(cols - j);
    _mm512_mask_storeu_ps(row + j, m, exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), s)));
  }
}

// Dot product of two float vectors of length d (masked tail).
__attribute__((target("avx512f")))
inline float dot(const float* a, const float* b, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = tail_mask(d - j);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + j), _mm512_maskz_loadu_ps(m, b + j), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// One query head over m keys: out = softmax(c * K q) V in base 2 (c = scale * log2 e), with the
// scores in `buf` (m floats). Key/value rows are `ks`/`vs` floats apart.
__attribute__((target("avx512f")))
inline void one_query(const float* q, const float* k, const float* v, float* out, float* buf, int64_t m, int64_t d,
               int64_t ks, int64_t vs, float c) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < m; ++j) {
    buf[j] = c * dot(q, k + j * ks, d);
    mx = std::max(mx, buf[j]);
  }
  row_exp2_shift(buf, m, mx);
  float sum = 0.f;
  for (int64_t j = 0; j < m; ++j) sum += buf[j];
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 msk = tail_mask(d - i);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < m; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(buf[j]), _mm512_maskz_loadu_ps(msk, v + j * vs + i), acc);
    _mm512_mask_storeu_ps(out + i, msk, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
  }
}

}  // namespace anyformer_attention
