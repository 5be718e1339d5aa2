// Dequantize an int8 / int4 / fp8 weight to bf16 on the CPU, via XLA's FFI: the weight of the
// many-row (prefill) steps' bf16 dot, written once per step at memory speed.
//
//   w[n, k] = bf16((v(q[n, k]) - zero[n, g]) * scale[n, g])   (one rounding, nearest even)
//
// v() and the layouts as in matvec_quant.cc (quant_decode.h decodes 32 weights at a time to
// bf16 exactly); any CPU without AVX-512 BF16 runs a scalar loop with the same arithmetic.
// Rows are split into chunks over XLA's intra-op thread pool (parallel.h).
//
// Shapes: q [N, K] s8 | [N, K / 2] u8 | [N, K] u8; scale [N, G] f32; zero [N, G] | [N, 0] f32;
// w [N, K] bf16; attr method 0 int8, 1 int4, 2 fp8.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "quant_decode.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace jaxserve::quant;  // NOLINT: the decode helpers

namespace {

constexpr int64_t kChunk = 32;  // weight rows per pool item

struct Weight {
  int64_t N, K, G, group, row_bytes;
  const uint8_t* q;
  const float* scale;
  const float* zero;  // or null
};

// Rows [n0, n1) of the weight, dequantized: w[n, k] = bf16((v - zero) * scale), one rounding.
template <int M>
void dequant_rows(const Weight& p, uint16_t* w, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.q + n * p.row_bytes;
    uint16_t* out = w + n * p.K;
    for (int64_t g = 0; g < p.G; ++g) {
      const float s = p.scale[n * p.G + g], z = p.zero ? p.zero[n * p.G + g] : 0.0f;
      const int64_t end = (g + 1) * p.group;
#if defined(JAXSERVE_QUANT_AVX512)
      const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
      for (int64_t k = g * p.group; k < end; k += 32) {
        const int64_t left = end - k;
        const __m512i v = (__m512i)decode<M>(row, k, left);  // exact values as bf16
        const __m512 lo = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
        const __m512 hi = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
        const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_sub_ps(hi, zv), sv),
                                               _mm512_mul_ps(_mm512_sub_ps(lo, zv), sv));
        _mm512_mask_storeu_epi16(out + k, lanes(left), (__m512i)b);
      }
#else
      for (int64_t k = g * p.group; k < end; ++k) {
        const float f = (value<M>(row, k) - z) * s;
        uint32_t bits;
        std::memcpy(&bits, &f, sizeof bits);
        if ((bits & 0x7fffffffu) > 0x7f800000u) {
          bits |= 0x400000u;  // NaN stays NaN
        } else {
          bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
        }
        out[k] = static_cast<uint16_t>(bits >> 16);
      }
#endif
    }
  }
}

// w [N, K] bf16 from (q, scale, zero), for the many-row steps' bf16 dot.
ffi::Error DequantBf16(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> zero, ffi::Result<ffi::AnyBuffer> w,
                       int32_t method) {
  auto qd = q.dimensions(), sd = scale.dimensions(), zd = zero.dimensions(), wd = w->dimensions();
  if (qd.size() != 2 || sd.size() != 2 || zd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("quant dequant: q, scale, zero and w must be 2-D");
  if (method < kInt8 || method > kFp8 || w->element_type() != ffi::DataType::BF16 ||
      q.element_type() != (method == kInt8 ? ffi::DataType::S8 : ffi::DataType::U8))
    return ffi::Error::InvalidArgument("quant dequant: method / q / w types disagree");
  Weight p{qd[0], wd[1], sd[1], 0, qd[1], nullptr, nullptr, nullptr};
  if (wd[0] != p.N || sd[0] != p.N || p.G < 1 || p.K % p.G ||
      qd[1] * (method == kInt4 ? 2 : 1) != p.K || (zd[1] != 0 && zd[1] != p.G))
    return ffi::Error::InvalidArgument("quant dequant: shapes of q, scale, zero, w disagree");
  p.group = p.K / p.G;
  if (method == kInt4 && p.group % 2)
    return ffi::Error::InvalidArgument("quant dequant: int4 groups must be even");
  p.q = static_cast<const uint8_t*>(q.untyped_data());
  p.scale = scale.typed_data();
  p.zero = zd[1] != 0 ? zero.typed_data() : nullptr;
  auto* out = static_cast<uint16_t*>(w->untyped_data());
  const int64_t chunks = (p.N + kChunk - 1) / kChunk;
  jaxserve::ParallelFor(pool, chunks, [&](int64_t c) {
    const int64_t n0 = c * kChunk, n1 = std::min<int64_t>(p.N, (c + 1) * kChunk);
    switch (method) {
      case kInt8: return dequant_rows<kInt8>(p, out, n0, n1);
      case kInt4: return dequant_rows<kInt4>(p, out, n0, n1);
      default: return dequant_rows<kFp8>(p, out, n0, n1);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveCpuDequantBf16, DequantBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // q [N, K | K / 2]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale [N, G]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // zero [N, G] | [N, 0]
                                  .Ret<ffi::AnyBuffer>()          // w [N, K] bf16
                                  .Attr<int32_t>("method"));
