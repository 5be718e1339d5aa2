// bf16 matmul for decode batches on AVX-512 BF16 CPUs without AMX (AMD Zen 4 / 5, Intel Cooper
// Lake), called from the jitted step through XLA's FFI.
//
// y[T, N] = x[T, K] . W[N, K]^T, bf16 in and out, f32 accumulation. A batch of decodes (T up to a
// few dozen rows) is compute-bound on these CPUs, and XLA:CPU runs it at about a third of the
// vdpbf16ps peak. Here the weight stays where it is ([N, K], read once per call): each pair of
// weights w[n, 2j:2j+2] is broadcast to all 16 lanes and meets 16 rows of x at once, so the
// lanes are rows of x and no horizontal sum is needed. x is packed per call into
// xp[K2, Tp, 2] (K2 = ceil(K / 2) pairs, Tp = T rounded up to 16, padding rows zero):
// one 64-byte vector holds the pair j of 16 rows.
//
// A block of R output columns x 16 * TV rows keeps R * TV accumulators in registers (about 24 of
// the 32); rows past 64 are further tiles of the same R columns, whose weights are then in L1.
// Output columns are split into chunks over XLA's own thread pool.
//
// Shapes: x [T, K] bf16; w [N, K] bf16; y [T, N] bf16; T >= 1.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512BF16__)
constexpr int64_t kTileRows = 64;  // rows of x per register block: TV <= 4 vectors of 16
constexpr int64_t kChunkBlocks = 8;  // column blocks per pool item

struct AlignedFree {
  void operator()(uint16_t* p) const { std::free(p); }
};

// A per-thread 64-byte aligned scratch buffer of at least n bf16 values.
uint16_t* scratch(int64_t n) {
  thread_local std::unique_ptr<uint16_t, AlignedFree> buf;
  thread_local int64_t size = 0;
  if (n > size) {
    size = (n + 31) / 32 * 32;
    buf.reset(static_cast<uint16_t*>(std::aligned_alloc(64, size * sizeof(uint16_t))));
  }
  return buf.get();
}

// xp[j, t, 0:2] = x[t, 2j:2j+2] for t < T, zero for T <= t < Tp and for the missing half of an
// odd K's last pair. 16 rows' pairs are one masked gather of 32-bit words; 16-row tiles are
// packed in parallel (a 512-row prefill chunk of K 4864 is ~80k gathers). This call: rows
// [t0, t0 + 16).
void pack_x(const uint16_t* x, uint16_t* xp, int64_t T, int64_t K, int64_t Tp, int64_t t0) {
  const int64_t pairs = K / 2, K2 = (K + 1) / 2;
  const int64_t live = std::clamp<int64_t>(T - t0, 0, 16);
  const __mmask16 mask = static_cast<__mmask16>((1u << live) - 1);
  // 16-bit element offsets (scale 2): with K odd a row starts mid-word
  const __m512i row = _mm512_mullo_epi32(
      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(t0)),
                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)),
      _mm512_set1_epi32(static_cast<int32_t>(K)));  // element offset of each row
  for (int64_t j = 0; j < pairs; ++j) {
    const __m512i idx = _mm512_add_epi32(row, _mm512_set1_epi32(static_cast<int32_t>(2 * j)));
    const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, idx, x, 2);
    _mm512_store_si512(xp + (j * Tp + t0) * 2, v);
  }
  if (K2 > pairs) {  // odd K: the last pair is (x[t, K - 1], 0)
    alignas(64) uint32_t last[16] = {};
    for (int64_t i = 0; i < live; ++i) last[i] = x[(t0 + i) * K + K - 1];
    std::memcpy(xp + (pairs * Tp + t0) * 2, last, sizeof last);
  }
}

inline __m512bh weight_pair(const uint16_t* wr, int64_t j) {  // (w[n, 2j], w[n, 2j + 1])
  uint32_t pair;
  std::memcpy(&pair, wr + 2 * j, sizeof pair);
  return (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pair));
}

// Columns [n, n + R) of rows [t0, t0 + 16 * TV) (rows past T are computed on zero padding and
// not stored).
template <int R, int TV>
void block(const uint16_t* xp, const uint16_t* w, uint16_t* y, int64_t T, int64_t Tp, int64_t K,
           int64_t N, int64_t n, int64_t t0) {
  __m512 acc[R][TV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < TV; ++v) acc[r][v] = _mm512_setzero_ps();
  const uint16_t* xt = xp + t0 * 2;
  const int64_t pairs = K / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    __m512bh xv[TV];
    for (int v = 0; v < TV; ++v)
      xv[v] = (__m512bh)_mm512_load_si512(xt + (j * Tp + 16 * v) * 2);
    for (int r = 0; r < R; ++r) {
      const __m512bh wb = weight_pair(w + (n + r) * K, j);
      for (int v = 0; v < TV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], wb, xv[v]);
    }
  }
  if (K % 2) {  // the last pair (w[n, K - 1], 0) against (x[t, K - 1], 0)
    for (int v = 0; v < TV; ++v) {
      const __m512bh xv = (__m512bh)_mm512_load_si512(xt + (pairs * Tp + 16 * v) * 2);
      for (int r = 0; r < R; ++r) {
        const __m512bh wb = (__m512bh)_mm512_set1_epi32(w[(n + r) * K + K - 1]);
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], wb, xv);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < TV; ++v) {
      alignas(32) uint16_t out[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(acc[r][v]));
      const int64_t base = t0 + 16 * v, live = std::min<int64_t>(16, T - base);
      for (int64_t i = 0; i < live; ++i) y[(base + i) * N + n + r] = out[i];
    }
  }
}

// Columns [n, n + R) of every row, in tiles of kTileRows rows.
template <int R>
void columns(const uint16_t* xp, const uint16_t* w, uint16_t* y, int64_t T, int64_t Tp,
             int64_t K, int64_t N, int64_t n) {
  for (int64_t t0 = 0; t0 < Tp; t0 += kTileRows) {
    switch (std::min<int64_t>(Tp - t0, kTileRows) / 16) {
      case 1: block<R, 1>(xp, w, y, T, Tp, K, N, n, t0); break;
      case 2: block<R, 2>(xp, w, y, T, Tp, K, N, n, t0); break;
      case 3: block<R, 3>(xp, w, y, T, Tp, K, N, n, t0); break;
      default: block<R, 4>(xp, w, y, T, Tp, K, N, n, t0); break;
    }
  }
}

// R columns per block: R * TV accumulators (TV of the first row tile) stay near 24.
template <int R>
void chunk(const uint16_t* xp, const uint16_t* w, uint16_t* y, int64_t T, int64_t Tp, int64_t K,
           int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) columns<R>(xp, w, y, T, Tp, K, N, n);
  for (; n < n1; ++n) columns<1>(xp, w, y, T, Tp, K, N, n);
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                  ffi::Result<ffi::AnyBuffer> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("dpbf16_matmul: x [T, K] and w [N, K] must share K");
  if (x.element_type() != ffi::DataType::BF16 || w.element_type() != ffi::DataType::BF16 ||
      y->element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("dpbf16_matmul: x, w and y must be bfloat16");
  const int64_t T = xd[0], K = xd[1], N = wd[0];
  if (T < 1 || K < 1 || T * K >= (int64_t{1} << 31))
    return ffi::Error::InvalidArgument("dpbf16_matmul: 1 <= T, 1 <= K, T * K < 2^31");
  const int64_t Tp = (T + 15) / 16 * 16, K2 = (K + 1) / 2;
  uint16_t* xp = scratch(K2 * Tp * 2);
  const auto* xd16 = static_cast<const uint16_t*>(x.untyped_data());
  jaxserve::ParallelFor(pool, Tp / 16, [&](int64_t i) { pack_x(xd16, xp, T, K, Tp, 16 * i); });
  const auto* wp = static_cast<const uint16_t*>(w.untyped_data());
  auto* yp = static_cast<uint16_t*>(y->untyped_data());
  const int tv = static_cast<int>(std::min<int64_t>(Tp, kTileRows) / 16);
  const int64_t R = tv == 4 ? 6 : tv == 3 ? 8 : 12;
  const int64_t per_item = R * kChunkBlocks;
  jaxserve::ParallelFor(pool, (N + per_item - 1) / per_item, [&](int64_t c) {
    const int64_t n0 = c * per_item, n1 = std::min(N, n0 + per_item);
    if (R == 6) chunk<6>(xp, wp, yp, T, Tp, K, N, n0, n1);
    else if (R == 8) chunk<8>(xp, wp, yp, T, Tp, K, N, n0, n1);
    else chunk<12>(xp, wp, yp, T, Tp, K, N, n0, n1);
  });
  return ffi::Error::Success();
}
#else
ffi::Error Matmul(ffi::ThreadPool, ffi::AnyBuffer, ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>) {
  return ffi::Error::Internal("dpbf16_matmul: built for a CPU without AVX-512 BF16");
}
#endif

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveCpuDpbf16Matmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [T, K]
                                  .Arg<ffi::AnyBuffer>()  // w [N, K]
                                  .Ret<ffi::AnyBuffer>());  // y [T, N]
