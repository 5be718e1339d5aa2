// Weight-only quantized matmul for decode steps on the CPU (W8A16 / W4A16 / fp8), via XLA's FFI.
//
//   y[T, N] = sum_g scale[n, g] * sum_{k in g} (v(q[n, k]) - zero[n, g]) * x[T, k]
//
// for a few bf16 rows T (decode: one per request). v() is the stored value: int8 as is; int4
// (uint8 [N, K / 2], element 2j in the low nibble of byte j, 2j+1 in the high one, each stored
// as value + 8); fp8 (uint8 [N, K], float8_e4m3fn bits). Scales are f32 [N, G] over input groups
// of K / G elements; zeros f32 [N, G] when asymmetric, else an empty [N, 0]. f32 accumulation,
// f32 output. Decode is bound by reading the weight, so each quantized byte is read once per
// call for all T rows (XLA:CPU's dot first converts the whole weight to float every step).
//
// AVX-512 paths. int8 / int4 (the usual case): x is first rounded to int16 with a power-of-
// two unit per chunk of up to 256 inputs of a group (|x| / unit < 2^15; the rounding error is
// at most one unit, <= 2^-14 of the chunk's largest |x|: no more than the bf16 rounding x
// already carries, for every input within 2^5 of that largest one); then vpdpwssd multiplies
// 32 sign-extended int8 weights (or 2 x 32 zero-extended int4 nibbles, x laid out even inputs
// then odd ones to match) by x into exact int32 sums: two instructions per 32 int8 weights
// instead of seven for a float decode (int8 with up to 4 rows is faster through the float path:
// see MatvecQuant). Each chunk's sums are scaled (unit * group scale) into
// f32 totals; zero points (int4's stored + 8, and asymmetric zeros) come off as
// scale * zero * sum(x). fp8, and any call whose x holds a NaN or an inf (so that they
// propagate exactly): 32 weights at a time are decoded to bf16 exactly (every int8 / int4 /
// e4m3 value is one; e4m3 by moving its exponent and mantissa bits, subnormals by a lookup)
// and meet x in vdpbf16ps with f32 sums. Any other CPU runs a plain loop with f32 arithmetic.
// e4m3 NaN bytes (0x7f / 0xff) read as 480 on every path, as in XLA's path. Output rows are
// split into chunks over XLA's intra-op thread pool (parallel.h); each chunk takes the token
// rows 8 at a time (the accumulators live in registers), its weights from cache after the first.
//
// Shapes: x [T, K] bf16; q [N, K] s8 | [N, K / 2] u8 | [N, K] u8; scale [N, G] f32;
// zero [N, G] | [N, 0] f32; y [T, N] f32; 1 <= T <= kMaxRows (in passes of kPass rows);
// attr method 0 int8, 1 int4, 2 fp8.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "quant_decode.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace jaxserve::quant;  // NOLINT: the decode helpers

namespace {

constexpr int64_t kMaxRows = 64;
constexpr int64_t kPass = 8;  // token rows per pass over a chunk of output rows (registers)
constexpr int64_t kChunk = 32;  // fewest output rows per pool item
constexpr int64_t kFloatInt8Rows = 4;  // int8 calls of up to this many rows: the float path
constexpr int64_t kItemsPerThread = 2;  // pool items per thread (see the call)

struct Problem {
  int64_t T, K, N, G, group;
  const uint16_t* x;   // [T, K] bf16
  const uint8_t* q;    // [N, K * bytes_per_elem]
  const float* scale;  // [N, G]
  const float* zero;   // [N, G] or null
  const float* xsum;   // [T, G]: sum of x over each group (only with zeros)
  float* y;            // [T, N]
  int64_t row_bytes;
};

// Any CPU: output rows [n0, n1), f32 arithmetic in the same order of groups.
template <int M>
void rows_portable(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.q + n * p.row_bytes;
    for (int64_t t = 0; t < p.T; ++t) {
      const uint16_t* xt = p.x + t * p.K;
      float total = 0.0f, corr = 0.0f;
      for (int64_t g = 0; g < p.G; ++g) {
        float s = 0.0f;
        for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k)
          s += value<M>(row, k) * bf16_to_f32(xt[k]);
        total += s * p.scale[n * p.G + g];
        if (p.zero) corr += p.zero[n * p.G + g] * p.scale[n * p.G + g] * p.xsum[t * p.G + g];
      }
      p.y[t * p.N + n] = total - corr;
    }
  }
}

#if defined(JAXSERVE_QUANT_AVX512)

// Output rows [n, n + R) for all T rows; R * T accumulators (and totals) in registers.
template <int M, int T, int R>
void block(const Problem& p, int64_t n) {
  __m512 total[R][T];
  float corr[R][T] = {};
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) total[r][t] = _mm512_setzero_ps();
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = p.q + (n + r) * p.row_bytes;
  for (int64_t g = 0; g < p.G; ++g) {
    __m512 acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    const int64_t end = (g + 1) * p.group;
    for (int64_t k = g * p.group; k < end; k += 32) {
      const int64_t left = end - k;
      __m512bh xv[T];
      for (int t = 0; t < T; ++t) {
        const uint16_t* xp = p.x + t * p.K + k;
        xv[t] = (__m512bh)(left >= 32 ? _mm512_loadu_si512(xp)
                                      : _mm512_maskz_loadu_epi16(lanes(left), xp));
      }
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(rows[r] + R * p.row_bytes +
                                                   (M == kInt4 ? k / 2 : k)),
                     _MM_HINT_T0);
        const __m512bh wv = decode<M>(rows[r], k, left);
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = p.scale[(n + r) * p.G + g];
      const __m512 sv = _mm512_set1_ps(s);
      for (int t = 0; t < T; ++t) total[r][t] = _mm512_fmadd_ps(acc[r][t], sv, total[r][t]);
      if (p.zero)
        for (int t = 0; t < T; ++t)
          corr[r][t] += p.zero[(n + r) * p.G + g] * s * p.xsum[t * p.G + g];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      p.y[t * p.N + n + r] = _mm512_reduce_add_ps(total[r][t]) - corr[r][t];
}

template <int M, int T>
void rows_t(const Problem& p, int64_t n0, int64_t n1) {
  // 1-2 rows: one weight row at a time, a single sequential stream (fp8, 84 projections of
  // the small model, 2 Zen 4 threads, T = 1: 7.1-9.0 ms against 10.4-12.5 ms with 8 rows
  // interleaved)
  constexpr int R = T <= 2 ? 1 : T <= 4 ? 2 : 1;
  int64_t n = n0;
  for (; n + R <= n1; n += R) block<M, T, R>(p, n);
  for (; n < n1; ++n) block<M, T, 1>(p, n);
}

template <int M>
void rows_fast(const Problem& p, int64_t n0, int64_t n1) {
  switch (p.T) {
    case 1: return rows_t<M, 1>(p, n0, n1);
    case 2: return rows_t<M, 2>(p, n0, n1);
    case 3: return rows_t<M, 3>(p, n0, n1);
    case 4: return rows_t<M, 4>(p, n0, n1);
    case 5: return rows_t<M, 5>(p, n0, n1);
    case 6: return rows_t<M, 6>(p, n0, n1);
    case 7: return rows_t<M, 7>(p, n0, n1);
    default: return rows_t<M, 8>(p, n0, n1);
  }
}
#define JAXSERVE_ROWS rows_fast
#define JAXSERVE_INT_PATH 1

// int8 / int4 with finite x: x as int16 with a power-of-two unit per chunk of up to kXChunk
// inputs of a group (|x| / unit < 2^15, rounded to nearest), then int16 x int16 -> int32
// vpdpwssd on the sign-extended int8 / zero-extended int4 weights: two instructions per 32
// int8 weights instead of the float path's seven.
constexpr int64_t kXChunk = 256;

struct XInt {
  std::vector<int16_t> v;   // [T, stride]; chunk c at c * kXChunk; int4: each 64 inputs as
                            // their 32 even then 32 odd ones (the nibble order of a byte run)
  std::vector<float> unit;  // [T, chunks]
  std::vector<float> gsum;  // [T, G]: sum of x over the group as the kernel sees it
  int64_t per_group = 0, chunks = 0, stride = 0;
};

// Chunk of `len` (<= kXChunk) bf16 inputs -> int16 in `out` (all kXChunk words written, zeros
// past len), returns their sum; *unit = the value of one int16 step (0 for an all-zero chunk).
// False when the chunk holds a NaN or an inf.
bool chunk_to_int16(const uint16_t* xs, int64_t len, bool int4, int16_t* out, float* unit,
                    int64_t* sum) {
  __m512i w[kXChunk / 32];
  __m512i mx = _mm512_setzero_si512();
  for (int i = 0; i < kXChunk / 32; ++i) {
    const int64_t left = len - 32 * i;
    w[i] = left >= 32 ? _mm512_loadu_si512(xs + 32 * i)
                      : _mm512_maskz_loadu_epi16(left > 0 ? lanes(left) : 0, xs + 32 * i);
    // |x| as bf16 bits orders like |x|; >= 0x7f80 is inf or NaN
    mx = _mm512_max_epu16(mx, _mm512_and_si512(w[i], _mm512_set1_epi16(0x7fff)));
  }
  const __m256i m16 =
      _mm256_max_epu16(_mm512_castsi512_si256(mx), _mm512_extracti64x4_epi64(mx, 1));
  const __m128i m8 = _mm_max_epu16(_mm256_castsi256_si128(m16), _mm256_extracti128_si256(m16, 1));
  uint16_t lanes8[8];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lanes8), m8);
  const uint16_t top = *std::max_element(lanes8, lanes8 + 8);
  if (top >= 0x7f80) return false;
  *sum = 0;
  if (top == 0) {
    std::memset(out, 0, kXChunk * sizeof(int16_t));
    *unit = 0.0f;
    return true;
  }
  // |x| < 2^e with e = biased exponent - 126; one step is 2^(e - 15)
  const int e = std::max((top >> 7) - 126, -100);
  const __m512 up = _mm512_set1_ps(std::ldexp(1.0f, 15 - e));
  *unit = std::ldexp(1.0f, e - 15);
  __m512i total = _mm512_setzero_si512();
  __m512i q[kXChunk / 32];
  for (int i = 0; i < kXChunk / 32; ++i) {
    const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm512_castsi512_si256(w[i])), 16));
    const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w[i], 1)), 16));
    const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(lo, up));  // nearest, |a| <= 2^15
    const __m512i b = _mm512_cvtps_epi32(_mm512_mul_ps(hi, up));
    const __m512i a16 = _mm512_min_epi32(a, _mm512_set1_epi32(32767));
    const __m512i b16 = _mm512_min_epi32(b, _mm512_set1_epi32(32767));
    total = _mm512_add_epi32(total, _mm512_add_epi32(a16, b16));
    q[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(a16)),
                              _mm512_cvtepi32_epi16(b16), 1);
  }
  *sum = _mm512_reduce_add_epi32(total);
  if (int4) {  // each 64 inputs: the 32 even ones, then the 32 odd ones
    alignas(64) int16_t even_idx[32], odd_idx[32];
    for (int i = 0; i < 32; ++i) {
      even_idx[i] = static_cast<int16_t>(2 * i);
      odd_idx[i] = static_cast<int16_t>(2 * i + 1);
    }
    const __m512i ie = _mm512_load_si512(even_idx), io = _mm512_load_si512(odd_idx);
    for (int i = 0; i < kXChunk / 32; i += 2) {
      const __m512i ev = _mm512_permutex2var_epi16(q[i], ie, q[i + 1]);
      const __m512i od = _mm512_permutex2var_epi16(q[i], io, q[i + 1]);
      q[i] = ev;
      q[i + 1] = od;
    }
  }
  for (int i = 0; i < kXChunk / 32; ++i) _mm512_storeu_si512(out + 32 * i, q[i]);
  return true;
}

// Token rows [t0, ...) of an XInt, as the blocks read them.
struct XView {
  const int16_t* v;
  const float* unit;
  const float* gsum;
  int64_t per_group, chunks, stride;
};

XView view(const XInt& xi, int64_t t0, int64_t G) {
  return {xi.v.data() + t0 * xi.stride, xi.unit.data() + t0 * xi.chunks, xi.gsum.data() + t0 * G,
          xi.per_group, xi.chunks, xi.stride};
}

// False when a row has a NaN or an inf (the caller runs the float path, which propagates them).
bool make_xint(const Problem& p, bool int4, XInt& xi) {
  xi.per_group = (p.group + kXChunk - 1) / kXChunk;
  xi.chunks = p.G * xi.per_group;
  xi.stride = xi.chunks * kXChunk;
  xi.v.resize(p.T * xi.stride);
  xi.unit.resize(p.T * xi.chunks);
  xi.gsum.assign(p.T * p.G, 0.0f);
  for (int64_t t = 0; t < p.T; ++t) {
    for (int64_t c = 0; c < xi.chunks; ++c) {
      const int64_t g = c / xi.per_group, j0 = (c % xi.per_group) * kXChunk;
      const int64_t len = std::min(kXChunk, p.group - j0);
      float unit;
      int64_t sum;
      if (!chunk_to_int16(p.x + t * p.K + g * p.group + j0, len, int4,
                          xi.v.data() + t * xi.stride + c * kXChunk, &unit, &sum))
        return false;
      xi.unit[t * xi.chunks + c] = unit;
      xi.gsum[t * p.G + g] += unit * static_cast<float>(sum);
    }
  }
  return true;
}

// Output rows [n, n + R) for all T rows from the int16 x. Each chunk's int32 sums become f32,
// times the chunk's x unit and the row's group scale, into f32 totals; the zero points (int4's
// stored + 8 and any asymmetric zero) come off once at the end as scale * zero * sum(x).
template <int M, int T, int R>
void block_int(const Problem& p, const XView& xi, int64_t n) {
  __m512 total[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) total[r][t] = _mm512_setzero_ps();
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = p.q + (n + r) * p.row_bytes;
  const __m512i low4 = _mm512_set1_epi16(0x000f);
  for (int64_t g = 0, c = 0; g < p.G; ++g)
  for (int64_t j0 = 0; j0 < p.group; j0 += kXChunk, ++c) {
    const int64_t k0 = g * p.group + j0, len = std::min(kXChunk, p.group - j0);
    const int16_t* xc = xi.v + c * kXChunk;
    __m512i acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
    if constexpr (M == kInt8) {
      for (int64_t j = 0; j < len; j += 32) {
        __m512i xv[T];
        for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_si512(xc + t * xi.stride + j);
        for (int r = 0; r < R; ++r) {
          const uint8_t* wp = rows[r] + k0 + j;
          _mm_prefetch(reinterpret_cast<const char*>(wp + R * p.row_bytes), _MM_HINT_T0);
          const __m256i b = len - j >= 32
                                ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp))
                                : _mm256_maskz_loadu_epi8(lanes(len - j), wp);
          const __m512i w = _mm512_cvtepi8_epi16(b);
          for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpwssd_epi32(acc[r][t], w, xv[t]);
        }
      }
    } else {
      for (int64_t j = 0; j < len; j += 64) {
        __m512i xlo[T], xhi[T];
        for (int t = 0; t < T; ++t) {
          xlo[t] = _mm512_loadu_si512(xc + t * xi.stride + j);
          xhi[t] = _mm512_loadu_si512(xc + t * xi.stride + j + 32);
        }
        for (int r = 0; r < R; ++r) {
          const uint8_t* wp = rows[r] + (k0 + j) / 2;
          _mm_prefetch(reinterpret_cast<const char*>(wp + R * p.row_bytes), _MM_HINT_T0);
          const __m256i b = len - j >= 64
                                ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp))
                                : _mm256_maskz_loadu_epi8(lanes((len - j) / 2), wp);
          const __m512i u = _mm512_cvtepu8_epi16(b);
          const __m512i lo = _mm512_and_si512(u, low4), hi = _mm512_srli_epi16(u, 4);
          for (int t = 0; t < T; ++t) {
            acc[r][t] = _mm512_dpwssd_epi32(acc[r][t], lo, xlo[t]);
            acc[r][t] = _mm512_dpwssd_epi32(acc[r][t], hi, xhi[t]);
          }
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const __m512 unit = _mm512_set1_ps(xi.unit[t * xi.chunks + c]);
      for (int r = 0; r < R; ++r) {
        const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][t]), unit);
        total[r][t] = _mm512_fmadd_ps(f, _mm512_set1_ps(p.scale[(n + r) * p.G + g]), total[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) {
      float corr = 0.0f;  // stored int4 nibbles are value + 8; minus any zero point
      for (int64_t g = 0; g < p.G; ++g) {
        const float off = (M == kInt4 ? 8.0f : 0.0f) + (p.zero ? p.zero[(n + r) * p.G + g] : 0.0f);
        corr += off * p.scale[(n + r) * p.G + g] * xi.gsum[t * p.G + g];
      }
      p.y[t * p.N + n + r] = _mm512_reduce_add_ps(total[r][t]) - corr;
    }
  }
}

template <int M, int T>
void rows_int_t(const Problem& p, const XView& xi, int64_t n0, int64_t n1) {
  // 2 * R * T accumulators and T (int4: 2T) x vectors within the 32 registers
  constexpr int R = T == 1 ? 8 : T == 2 ? 4 : T <= 4 ? 2 : 1;
  int64_t n = n0;
  for (; n + R <= n1; n += R) block_int<M, T, R>(p, xi, n);
  for (; n < n1; ++n) block_int<M, T, 1>(p, xi, n);
}

template <int M>
void rows_int(const Problem& p, const XView& xi, int64_t n0, int64_t n1) {
  switch (p.T) {
    case 1: return rows_int_t<M, 1>(p, xi, n0, n1);
    case 2: return rows_int_t<M, 2>(p, xi, n0, n1);
    case 3: return rows_int_t<M, 3>(p, xi, n0, n1);
    case 4: return rows_int_t<M, 4>(p, xi, n0, n1);
    case 5: return rows_int_t<M, 5>(p, xi, n0, n1);
    case 6: return rows_int_t<M, 6>(p, xi, n0, n1);
    case 7: return rows_int_t<M, 7>(p, xi, n0, n1);
    default: return rows_int_t<M, 8>(p, xi, n0, n1);
  }
}
#else
#define JAXSERVE_ROWS rows_portable
#endif

void rows(int method, const Problem& p, int64_t n0, int64_t n1) {
  switch (method) {
    case kInt8: return JAXSERVE_ROWS<kInt8>(p, n0, n1);
    case kInt4: return JAXSERVE_ROWS<kInt4>(p, n0, n1);
    default: return JAXSERVE_ROWS<kFp8>(p, n0, n1);
  }
}

// Token rows [t0, t0 + n) of a problem.
Problem rows_of(const Problem& p, int64_t t0, int64_t n) {
  Problem s = p;
  s.T = n;
  s.x = p.x + t0 * p.K;
  s.y = p.y + t0 * p.N;
  s.xsum = p.xsum ? p.xsum + t0 * p.G : nullptr;
  return s;
}

ffi::Error MatvecQuant(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer q,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> zero,
                       ffi::Result<ffi::Buffer<ffi::F32>> y, int32_t method) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions(), zd = zero.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 2 || zd.size() != 2)
    return ffi::Error::InvalidArgument("quant matvec: x, q, scale and zero must be 2-D");
  if (x.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("quant matvec: x must be bfloat16");
  if (method < kInt8 || method > kFp8)
    return ffi::Error::InvalidArgument("quant matvec: method must be 0 (int8), 1 (int4), 2 (fp8)");
  const auto want_q = method == kInt8 ? ffi::DataType::S8 : ffi::DataType::U8;
  if (q.element_type() != want_q)
    return ffi::Error::InvalidArgument("quant matvec: q must be int8 (int8) or uint8 (int4, fp8)");
  Problem p{xd[0], xd[1], qd[0], sd[1], 0, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
            qd[1]};
  const int64_t per_byte = method == kInt4 ? 2 : 1;
  if (p.T < 1 || p.T > kMaxRows) return ffi::Error::InvalidArgument("quant matvec: 1 <= T <= 64");
  if (qd[1] * per_byte != p.K || sd[0] != p.N || p.G < 1 || p.K % p.G)
    return ffi::Error::InvalidArgument("quant matvec: q [N, K(/2)] and scale [N, G | K] disagree");
  p.group = p.K / p.G;
  if (method == kInt4 && p.group % 2)
    return ffi::Error::InvalidArgument("quant matvec: int4 groups must be even");
  const bool has_zero = zd[1] != 0;
  if (has_zero && (zd[0] != p.N || zd[1] != p.G))
    return ffi::Error::InvalidArgument("quant matvec: zero must be [N, G] or [N, 0]");
  p.x = static_cast<const uint16_t*>(x.untyped_data());
  p.q = static_cast<const uint8_t*>(q.untyped_data());
  p.scale = scale.typed_data();
  p.y = y->typed_data();
  std::vector<float> xsum;
  if (has_zero) {
    p.zero = zero.typed_data();
    xsum.assign(p.T * p.G, 0.0f);
    for (int64_t t = 0; t < p.T; ++t)
      for (int64_t k = 0; k < p.K; ++k)
        xsum[t * p.G + k / p.group] += bf16_to_f32(p.x[t * p.K + k]);
    p.xsum = xsum.data();
  }
  // Each pool item: a chunk of output rows for all token rows, kPass token rows at a time (the
  // chunk's weights come from memory once, then from cache).
  // Output rows per pool item: kItemsPerThread items a thread, at least kChunk rows. Long runs
  // of rows keep each thread's weight reads one sequential stream (int8, T = 1, 84 projections
  // of the small model on 2 Zen 4 threads: 8.2-8.8 ms with 128-row items against 9.3-10.7 ms
  // with 32-row ones)
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_item = std::max<int64_t>(
      kChunk, (p.N + kItemsPerThread * threads - 1) / (kItemsPerThread * threads) / 8 * 8 + 8);
  const int64_t chunks = (p.N + per_item - 1) / per_item;
#if defined(JAXSERVE_INT_PATH)
  XInt xi;  // this call's x as int16; the pool's workers read it
  // int8 with up to 4 rows takes the float path: its exact bf16 decode + vdpbf16ps, one weight
  // row at a time for 1-2 rows (rows_t), beat the int16 path (84 projections of the small
  // model, 2 Zen 4 threads: T = 1 6.8-8.9 vs 9.7-9.8 ms, T = 2 7.8-9.9 vs 10.0-14.5 ms, T = 4
  // 10.7 vs 11.4-11.9 ms); with 8 rows the int16 path wins (18.7-23.0 vs 22.5-26.3 ms)
  const bool int_path = method == kInt4 || (method == kInt8 && p.T > kFloatInt8Rows);
  if (int_path && make_xint(p, method == kInt4, xi)) {
    jaxserve::ParallelFor(pool, chunks, [&](int64_t c) {
      const int64_t n0 = c * per_item, n1 = std::min<int64_t>(p.N, (c + 1) * per_item);
      for (int64_t t0 = 0; t0 < p.T; t0 += kPass) {
        const Problem s = rows_of(p, t0, std::min(kPass, p.T - t0));
        const XView v = view(xi, t0, p.G);
        if (method == kInt8) {
          rows_int<kInt8>(s, v, n0, n1);
        } else {
          rows_int<kInt4>(s, v, n0, n1);
        }
      }
    });
    return ffi::Error::Success();
  }
#endif
  jaxserve::ParallelFor(pool, chunks, [&](int64_t c) {
    const int64_t n0 = c * per_item, n1 = std::min<int64_t>(p.N, (c + 1) * per_item);
    for (int64_t t0 = 0; t0 < p.T; t0 += kPass)
      rows(method, rows_of(p, t0, std::min(kPass, p.T - t0)), n0, n1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveCpuMatvecQuant, MatvecQuant,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()          // x [T, K] bf16
                                  .Arg<ffi::AnyBuffer>()          // q [N, K | K / 2]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale [N, G]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // zero [N, G] | [N, 0]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y [T, N]
                                  .Attr<int32_t>("method"));
