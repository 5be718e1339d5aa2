// Per-block math of the CPU paged-attention kernel (paged_attention.cc): bf16 / f32 loads and
// stores, a branch-free exp for non-positive inputs, one block's scores against kRows query
// rows, masked and capped scores, exp-and-sum, the online softmax of a block, p . V.
// Only paged_attention.cc includes it.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "vec_math.h"

namespace jaxserve::attn {

#if defined(__AVX512F__)
using jaxserve::exp_nonpositive16;
#endif

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {  // round to nearest even, NaN kept
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    p[i] = static_cast<uint16_t>((bits >> 16) | 0x40u);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  p[i] = static_cast<uint16_t>(bits >> 16);
}

struct Params {
  float scale;
  int32_t window;  // 0: none
  float soft_cap;  // 0: none
};

// exp(x) for x <= 0 (scores minus their running max); no branches, so loops over a block of
// keys vectorise. 2^n * p(r) with r in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial:
// relative error < 2e-7, below the f32 rounding of the result; x < -87 gives 0.
inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.0f);
  const float n = std::nearbyint(xc * 1.44269504f);
  const float r = (xc - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

constexpr int kRows = 8;     // query rows scored together (independent accumulator chains)
constexpr int kMaxBlock = 256;  // largest block_size the kernel takes (checked by the caller)

// s[r][0:bs] = q_r . K^T for `nr` <= kRows query rows (page dtype) against one block's K.
inline void block_scores(const uint16_t* q, int64_t nr, const uint16_t* kt, int64_t D, int64_t bs,
                         float (*s)[kMaxBlock]) {
#if defined(__AVX512BF16__)
  if (bs % 16 == 0 && nr == kRows) {
    for (int64_t c = 0; c < bs; c += 16) {
      __m512 acc[kRows];
      for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t p = 0; p < D / 2; ++p) {
        const __m512bh k = (__m512bh)_mm512_loadu_si512(kt + (p * bs + c) * 2);
        for (int r = 0; r < kRows; ++r) {
          int32_t pair;
          std::memcpy(&pair, q + r * D + 2 * p, sizeof pair);
          acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(pair), k);
        }
      }
      for (int r = 0; r < kRows; ++r) _mm512_storeu_ps(&s[r][c], acc[r]);
    }
    return;
  }
#endif
  for (int64_t r = 0; r < nr; ++r) {
    float* sr = s[r];
    for (int64_t j = 0; j < bs; ++j) sr[j] = 0.0f;
    for (int64_t p = 0; p < D / 2; ++p) {
      const float q0 = load(q, r * D + 2 * p), q1 = load(q, r * D + 2 * p + 1);
      const uint16_t* row = kt + p * bs * 2;
#pragma omp simd
      for (int64_t j = 0; j < bs; ++j) sr[j] += q0 * load(row, 2 * j) + q1 * load(row, 2 * j + 1);
    }
  }
}

inline void block_scores(const float* q, int64_t nr, const float* kt, int64_t D, int64_t bs,
                         float (*s)[kMaxBlock]) {
#if defined(__AVX512F__)
  if (bs % 16 == 0 && nr == kRows) {  // kRows accumulators in registers per 16 keys
    for (int64_t c = 0; c < bs; c += 16) {
      __m512 acc[kRows];
      for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t i = 0; i < D; ++i) {
        const __m512 k = _mm512_loadu_ps(kt + i * bs + c);
        for (int r = 0; r < kRows; ++r)
          acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * D + i]), k, acc[r]);
      }
      for (int r = 0; r < kRows; ++r) _mm512_storeu_ps(&s[r][c], acc[r]);
    }
    return;
  }
#endif
  for (int64_t r = 0; r < nr; ++r) {
    float* sr = s[r];
    for (int64_t j = 0; j < bs; ++j) sr[j] = 0.0f;
    for (int64_t i = 0; i < D; ++i) {
      const float qi = q[r * D + i];
      const float* row = kt + i * bs;
#pragma omp simd
      for (int64_t j = 0; j < bs; ++j) sr[j] += qi * row[j];
    }
  }
}

// acc[0:D] = acc * corr + sum_j p[j] * v[j] over n keys (v: f32 [n, D]).
inline void accumulate(float* acc, float corr, const float* p, const float* v, int64_t n,
                       int64_t D) {
#if defined(__AVX512F__)
  if (D % 16 == 0 && D <= 256) {
    __m512 a[16];
    const int64_t chunks = D / 16;
    const __m512 c = _mm512_set1_ps(corr);
    for (int64_t k = 0; k < chunks; ++k) a[k] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * k), c);
    for (int64_t j = 0; j < n; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      for (int64_t k = 0; k < chunks; ++k)
        a[k] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + j * D + 16 * k), a[k]);
    }
    for (int64_t k = 0; k < chunks; ++k) _mm512_storeu_ps(acc + 16 * k, a[k]);
    return;
  }
#endif
  for (int64_t i = 0; i < D; ++i) acc[i] *= corr;
  for (int64_t j = 0; j < n; ++j) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) acc[i] += p[j] * v[j * D + i];
  }
}


// dst[0:bs] = raw[0:bs] * scale, soft-capped (cap * tanh(x / cap) = cap * (1 - e) / (1 + e),
// e = exp(-2|x| / cap)), and -inf outside keys [lo, hi) (entry j is key start + j), so a NaN
// score of an unwritten slot never passes; returns max(m, max of dst). dst may be raw.
inline float masked_scores(const float* raw, float* dst, int64_t bs, int64_t start, int64_t lo,
                           int64_t hi, const Params& p, float m) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  if (bs % 16 == 0) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i vlo = _mm512_set1_epi32(static_cast<int32_t>(lo));
    const __m512i vhi = _mm512_set1_epi32(static_cast<int32_t>(hi));
    __m512 vmax = _mm512_set1_ps(m);
    for (int64_t c = 0; c < bs; c += 16) {
      const __m512i key =
          _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(start + c)), lane);
      const __mmask16 ok = _mm512_cmp_epi32_mask(key, vlo, _MM_CMPINT_NLT) &
                           _mm512_cmp_epi32_mask(key, vhi, _MM_CMPINT_LT);
      __m512 x = _mm512_mul_ps(_mm512_loadu_ps(raw + c), _mm512_set1_ps(p.scale));
      if (p.soft_cap > 0.0f) {
        const __m512 cap = _mm512_set1_ps(p.soft_cap);
        const __m512 e = exp_nonpositive16(
            _mm512_div_ps(_mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(-2.0f)), cap));
        const __m512 t = _mm512_div_ps(_mm512_mul_ps(cap, _mm512_sub_ps(_mm512_set1_ps(1.0f), e)),
                                       _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
        x = _mm512_mask_sub_ps(t, neg, _mm512_setzero_ps(), t);
      }
      x = _mm512_mask_blend_ps(ok, _mm512_set1_ps(neg_inf), x);
      _mm512_storeu_ps(dst + c, x);
      vmax = _mm512_max_ps(vmax, x);
    }
    return _mm512_reduce_max_ps(vmax);
  }
#endif
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < bs; ++j) {
    const int64_t key = start + j;
    float x = raw[j] * p.scale;
    if (p.soft_cap > 0.0f) {
      const float e = exp_nonpositive(-2.0f * std::fabs(x) / p.soft_cap);
      x = std::copysign(p.soft_cap * (1.0f - e) / (1.0f + e), x);
    }
    dst[j] = key >= lo && key < hi ? x : neg_inf;
    m = std::max(m, dst[j]);
  }
  return m;
}

// s[0:n] = exp(s - m) (-inf -> 0); returns their sum.
inline float exp_sum(float* s, int64_t n, float m) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  if (n % 16 == 0) {
    __m512 vsum = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(m);
    for (int64_t c = 0; c < n; c += 16) {
      const __m512 x = _mm512_loadu_ps(s + c);
      const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(neg_inf), _CMP_NEQ_OQ);
      const __m512 e = _mm512_maskz_mov_ps(live, exp_nonpositive16(_mm512_sub_ps(x, mv)));
      _mm512_storeu_ps(s + c, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    return _mm512_reduce_add_ps(vsum);
  }
#endif
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = s[j] == neg_inf ? 0.0f : exp_nonpositive(s[j] - m);
    sum += s[j];
  }
  return sum;
}

// Turns one row's raw scores into probabilities for this block (keys past the first n, after
// the query position qpos or outside its window -> 0) and updates its running max / sum;
// returns the factor its accumulator must be scaled by, or a negative value when nothing in
// the block is visible to it.
inline float softmax_block(float* s, int64_t bs, int64_t n, int64_t start, int64_t qpos,
                           const Params& p, float& m, float& l) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t lo = p.window > 0 ? qpos - p.window + 1 : start;
  const int64_t hi = std::min(qpos + 1, start + n);
  const float block_max = masked_scores(s, s, bs, start, lo, hi, p, neg_inf);
  if (block_max == neg_inf) return -1.0f;
  const float m_new = std::max(m, block_max);
  const float corr = m == neg_inf ? 0.0f : exp_nonpositive(m - m_new);
  l = l * corr + exp_sum(s, bs, m_new);
  m = m_new;
  return corr;
}

}  // namespace jaxserve::attn
