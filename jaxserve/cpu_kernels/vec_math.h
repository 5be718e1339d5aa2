// 16-lane f32 math shared by the CPU kernels: exp of non-positive inputs (the attention's
// softmax) and silu (the packed matmul's gate epilogue).
#pragma once

#include <immintrin.h>

namespace jaxserve {

#if defined(__AVX512F__)
// exp(x) for x <= 0 on 16 lanes: 2^n * p(r), r in [-ln2/2, ln2/2], a degree-6 Taylor
// polynomial (relative error < 2e-7); x < -87 gives 0.
inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  for (float c : {1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

// silu(g) = g * sigmoid(g) on 16 lanes, with e = exp(-|g|) so nothing overflows: sigmoid is
// 1 / (1 + e) for g >= 0 and e / (1 + e) below. NaN stays NaN.
inline __m512 silu16(__m512 g) {
  const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mul_ps(g, _mm512_mask_mul_ps(inv, neg, inv, e));
}
#endif

}  // namespace jaxserve
