// Quantized KV rows for the CPU attention kernel: the int8 / fp8 e4m3 codecs and the quantizer.
//
// The quantizer is jaxserve/layers/kv_quant.py's `quantize_tokens`, bit for bit: per (token, kv
// head), scale = max |x| * f32(1 / qmax) over head_dim (qmax 127 for int8, 448 for e4m3), each
// value x * (1 / scale) (one f32 reciprocal per row, as XLA computes x / scale) rounded to
// nearest even, int8 clipped to +-127, e4m3
// clipped to +-448 then rounded to its 3 mantissa bits (subnormals included); an all-zero vector
// gets scale 0 and zero values. Values are stored as bytes: int8, or e4m3fn bit patterns.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace jaxserve::kvq {

constexpr int64_t kScaleBytes = 4;  // the f32 scale after each row's values

struct Int8Codec {
  static constexpr double kQmax = 127.0;
  static float widen(uint8_t b) { return static_cast<float>(static_cast<int8_t>(b)); }
  // out[0:n] = widen(in[0:n]) * scale
  static void widen_n(const uint8_t* in, int64_t n, float* out, float scale) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 s = _mm512_set1_ps(scale);
    for (; i + 16 <= n; i += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
      _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), s));
    }
#endif
    for (; i < n; ++i) out[i] = widen(in[i]) * scale;
  }
  static uint8_t narrow(float y) {  // y = x / scale
    float r = std::nearbyint(y);   // the default rounding mode: nearest even
    r = std::min(std::max(r, -127.0f), 127.0f);
    if (r != r) r = 0.0f;  // NaN input (the scale is NaN then too)
    return static_cast<uint8_t>(static_cast<int8_t>(r));
  }
};

// float8_e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, 0x7f / 0xff NaN.
struct E4M3Table {
  float v[256];
  E4M3Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      float a = e == 0 ? std::ldexp(static_cast<float>(m), -9)  // subnormal: m * 2^-9
                       : std::ldexp(static_cast<float>(8 + m), e - 10);  // (1 + m/8) * 2^(e-7)
      if ((b & 0x7f) == 0x7f) a = std::numeric_limits<float>::quiet_NaN();
      v[b] = (b & 0x80) ? -a : a;
    }
  }
};
inline const E4M3Table kE4M3;

struct E4M3Codec {
  static constexpr double kQmax = 448.0;
  static float widen(uint8_t b) { return kE4M3.v[b]; }
  // out[0:n] = widen(in[0:n]) * scale. AVX-512: the e4m3 bits shifted into an f16's (sign to
  // bit 15, exponent and mantissa under bit 14: the same value times 2^-8, subnormals included),
  // converted by vcvtph2ps, times 2^8; 0x7f / 0xff give NaN.
  static void widen_n(const uint8_t* in, int64_t n, float* out, float scale) {
    int64_t i = 0;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    const __m512 s = _mm512_set1_ps(scale * 256.0f);
    const __m512 nan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
    for (; i + 16 <= n; i += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
      const __m256i w = _mm256_cvtepu8_epi16(b);
      const __m256i mag = _mm256_and_si256(w, _mm256_set1_epi16(0x7f));
      const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8),
                                        _mm256_slli_epi16(mag, 7));
      const __mmask16 is_nan = _mm256_cmpeq_epi16_mask(mag, _mm256_set1_epi16(0x7f));
      const __m512 f = _mm512_mul_ps(_mm512_cvtph_ps(h), s);
      _mm512_storeu_ps(out + i, _mm512_mask_blend_ps(is_nan, f, nan));
    }
#endif
    for (; i < n; ++i) out[i] = widen(in[i]) * scale;
  }
  static uint8_t narrow(float y) {  // clip to +-448, round to nearest even (as ml_dtypes)
    if (y != y) return 0x7f;
    y = std::min(std::max(y, -448.0f), 448.0f);
    uint32_t bits;
    std::memcpy(&bits, &y, sizeof bits);
    const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
    bits &= 0x7fffffffu;
    float a;
    std::memcpy(&a, &bits, sizeof a);
    if (a < 0x1p-6f)  // below the smallest normal: a multiple of 2^-9 (8 * 2^-9 is 0x08, normal)
      return sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f));
    const uint32_t r = bits + 0x7ffffu + ((bits >> 20) & 1u);  // round 23 -> 3 mantissa bits
    return sign | static_cast<uint8_t>(((((r >> 23) & 0xffu) - 120u) << 3) | ((r >> 20) & 7u));
  }
};

// out[0:n] = the bf16 bits of widen(in[0:n]): exact (int8 and e4m3 values have <= 8 significant
// bits), so the f32 bits' top half.
template <typename Codec>
void widen_bf16_n(const uint8_t* in, int64_t n, uint16_t* out) {
  alignas(64) float buf[16];
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    Codec::widen_n(in + i, 16, buf, 1.0f);
#if defined(__AVX512F__)
    const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(_mm512_load_ps(buf)), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(bits));
#else
    for (int k = 0; k < 16; ++k) {
      uint32_t b;
      std::memcpy(&b, &buf[k], sizeof b);
      out[i + k] = static_cast<uint16_t>(b >> 16);
    }
#endif
  }
  for (; i < n; ++i) {
    const float f = Codec::widen(in[i]);
    uint32_t b;
    std::memcpy(&b, &f, sizeof b);
    out[i] = static_cast<uint16_t>(b >> 16);
  }
}

// Quantizes x [D] (f32) into out [D] (bytes of `Codec`); returns the row's scale.
template <typename Codec>
float quantize_row(const float* x, int64_t D, uint8_t* out) {
  float amax = 0.0f;
  for (int64_t i = 0; i < D; ++i) {
    const float a = std::fabs(x[i]);
    amax = (a > amax || a != a) ? a : amax;  // NaN sticks, as jnp.max's
  }
  const float scale = amax * static_cast<float>(1.0 / Codec::kQmax);
  const float inv = 1.0f / (scale > 0.0f ? scale : 1.0f);
  for (int64_t i = 0; i < D; ++i) out[i] = scale > 0.0f ? Codec::narrow(x[i] * inv) : 0;
  return scale;
}

}  // namespace jaxserve::kvq
