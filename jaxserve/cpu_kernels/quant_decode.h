// Decoding of int8 / int4 / fp8 weight bytes shared by the quantized CPU kernels (matvec_quant.cc,
// dequant_bf16.cc); the layouts are those of jaxserve/layers/quant_scheme.py.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace jaxserve::quant {

enum Method { kInt8 = 0, kInt4 = 1, kFp8 = 2 };

inline float bf16_to_f32(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The scalar value of element k of weight row `row` (before scale and zero point).
template <int M>
inline float value(const uint8_t* row, int64_t k) {
  if constexpr (M == kInt8) {
    return static_cast<float>(static_cast<int8_t>(row[k]));
  } else if constexpr (M == kInt4) {
    const uint8_t b = row[k / 2];
    return static_cast<float>(((k & 1) ? b >> 4 : b & 15) - 8);
  } else {
    const uint8_t b = row[k];
    const int e = (b >> 3) & 15, m = b & 7;
    const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9)
                             : std::ldexp(static_cast<float>(8 + m), e - 10);
    return (b & 0x80) ? -mag : mag;
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__F16C__) && defined(__AVX512VNNI__)
#define JAXSERVE_QUANT_AVX512 1

inline __mmask32 lanes(int64_t n) {  // the first n of 32 lanes
  return n >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1);
}

// 32 weights of a row from element k (the first n valid, n even), as bf16.
template <int M>
inline __m512bh decode(const uint8_t* row, int64_t k, int64_t n) {
  if constexpr (M == kInt8) {
    const uint8_t* p = row + k;
    __m128i a, b;
    if (n >= 32) {
      a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
    } else {
      const __mmask32 m = lanes(n);
      a = _mm_maskz_loadu_epi8(static_cast<__mmask16>(m), p);
      b = _mm_maskz_loadu_epi8(static_cast<__mmask16>(m >> 16), p + 16);
    }
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    return _mm512_cvtne2ps_pbh(hi, lo);
  } else if constexpr (M == kInt4) {
    const uint8_t* p = row + k / 2;
    const __m128i bytes = n >= 32 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                  : _mm_maskz_loadu_epi8(static_cast<__mmask16>(lanes(n / 2)), p);
    const __m512i u = _mm512_cvtepu8_epi32(bytes);  // dword j = byte j
    // word 2j = low nibble, word 2j+1 = high nibble: (u | u << 12) & 0x000f000f
    const __m512i nib = _mm512_ternarylogic_epi32(u, _mm512_slli_epi32(u, 12),
                                                  _mm512_set1_epi32(0x000f000f), 0xA8);
    // bf16 bits of nibble - 8 for nibbles 0..15 (-8 .. 7)
    const __m512i table = _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  //
        0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0x0000,
        -0x4080, -0x4000, -0x3fc0, -0x3f80, -0x3f60, -0x3f40, -0x3f20, -0x3f00);
    return (__m512bh)_mm512_permutexvar_epi16(nib, table);
  } else {
    const uint8_t* p = row + k;
    const __m256i bytes = n >= 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi8(lanes(n), p);
    const __m512i w = _mm512_cvtepi8_epi16(bytes);  // s eeee mmm, sign-extended
    // normal (e >= 1): bf16 bits (e + 120) << 7 | m << 4 = ((w << 4) & 0x07f0) + 0x3c00
    const __m512i normal = _mm512_add_epi16(
        _mm512_and_si512(_mm512_slli_epi16(w, 4), _mm512_set1_epi16(0x07f0)),
        _mm512_set1_epi16(0x3c00));
    // subnormal (e == 0): m * 2^-9, looked up by m (the low 5 bits of w are m when e == 0)
    const __m512i sub = _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  //
        0x3c60, 0x3c40, 0x3c20, 0x3c00, 0x3bc0, 0x3b80, 0x3b00, 0x0000);
    const __mmask32 is_sub = _mm512_testn_epi16_mask(w, _mm512_set1_epi16(0x0078));
    const __m512i mag = _mm512_mask_permutexvar_epi16(normal, is_sub, w, sub);
    // | the sign bit
    const __m512i sign = _mm512_set1_epi16(static_cast<int16_t>(0x8000));
    return (__m512bh)_mm512_ternarylogic_epi32(mag, w, sign, 0xF8);  // mag | (w & sign)
  }
}
#endif

}  // namespace jaxserve::quant
