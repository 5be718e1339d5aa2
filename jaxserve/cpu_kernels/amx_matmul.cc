// bf16 matmul on Intel AMX tiles for decode batches and prefill chunks, called from the jitted
// step through XLA's FFI.
//
// y[T, N] = x[T, K] . W[N, K]^T, bf16 in and out, f32 accumulation.
//
// The weight is the tiles' A operand, loaded straight from its [N, K] layout: a tile is 16 weight
// rows x 32 k. XLA:CPU's matmul library packs a copy of the weight on every call instead. x is
// the B operand, packed once per call into VNNI pairs laid out tile by tile, so that every x tile
// is 1 KB of contiguous memory (a strided x tile maps its 16 rows onto a few L1 sets). A result tile is therefore transposed (16 n x 16 t, f32) and is rounded to
// bf16 on its way out. A pool item owns a block of 256 weight rows and walks it k-block by
// k-block: the k-block's slice of x (<= 16 KB) stays in L1 while each 16-row panel of the block
// streams its weights once, accumulating into f32 tiles kept in L2 between k-blocks. (Walking a
// whole panel over K instead re-reads all of x from L2 per panel: T/16 times the weight bytes.)
//
// Shapes: x [T, K] bf16; w [N, K] bf16; y [T, N] bf16. T >= 1, K % 32 == 0, N % 16 == 0.
// Linux needs a one-time permission (arch_prctl ARCH_REQ_XCOMP_PERM) before a thread may use
// the tile registers; JaxserveAmxReady() asks for it and reports whether AMX can be used.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;       // weight rows per tile
constexpr int64_t kKStep = 32;       // bf16 k per tile row (64 bytes)
constexpr int64_t kGroup = 64;       // tokens per accumulator group: 4 tiles of 16
constexpr int64_t kBlockRows = 256;  // most weight rows per pool item (about 8 items or more)
constexpr int64_t kBlockK = 128;     // k per block: x slice of 4 tiles x 4 steps = 16 KB
constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;

// Palette 1: tiles 0-3 accumulate 16 n x 16 t f32; tile 4 holds W (16 n x 32 k bf16);
// tile 5 holds x (16 k-pairs x 16 t x 2 bf16). Every tile is 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void load_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 6; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// n elements of a per-thread scratch vector, 64-byte aligned: a tile row that straddles two
// cache lines halves the tile loads' speed.
template <typename T>
T* aligned(std::vector<T>& v, int64_t n) {
  v.resize(n + 64 / sizeof(T));
  const auto p = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<T*>((p + 63) & ~uintptr_t{63});
}

// Packed x, 32-bit words [groups of 64 tokens][K/32 steps][4 tiles][16 k-pairs][16 tokens]: one
// contiguous 1 KB tile per (group, k step, 16 tokens); a word is the bf16 pair
// x[t, 2kp : 2kp + 2], zero for t >= T.
inline int64_t x_tile(int64_t g, int64_t s, int64_t steps) { return (g * steps + s) * 4 * 256; }

void pack_x(const uint32_t* x32, uint32_t* xv, int64_t T, int64_t Kp, int64_t g) {
  const int64_t steps = Kp / 16;
  const int64_t tiles = std::min<int64_t>(4, (T - g * kGroup + 15) / 16);  // the rest is unread
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5,
                                                           4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int>(Kp)));
  for (int64_t j = 0; j < tiles; ++j) {
    const int64_t t0 = g * kGroup + j * 16;
    const int64_t valid = std::min<int64_t>(16, T - t0);
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);  // tokens t < T
    for (int64_t s = 0; s < steps; ++s) {
      uint32_t* tile = xv + x_tile(g, s, steps) + j * 256;
      const uint32_t* src = x32 + t0 * Kp + s * 16;
      for (int64_t kr = 0; kr < 16; ++kr)  // tile row kr: word kr of each token's 16 pairs
        _mm512_storeu_si512(tile + kr * 16, _mm512_mask_i32gather_epi32(
                                               _mm512_setzero_si512(), mask, rows, src + kr, 4));
    }
  }
}

// One (panel, token group, k-block): accumulators from `acc` (or zero on the first k-block),
// the k-steps, accumulators back. acc is [16 n][64 t] f32 of this panel and group.
template <int Tiles>
void panel_kblock(const uint32_t* xg, const uint16_t* wn, float* acc, int64_t K, int64_t kb,
                  int64_t ke, const uint16_t* prefetch_rows) {
  constexpr int64_t stride = kGroup * 4;  // bytes per n row of acc
  if (kb == 0) {
    _tile_zero(0);
    if (Tiles > 1) _tile_zero(1);
    if (Tiles > 2) _tile_zero(2);
    if (Tiles > 3) _tile_zero(3);
  } else {
    _tile_loadd(0, acc, stride);
    if (Tiles > 1) _tile_loadd(1, acc + 16, stride);
    if (Tiles > 2) _tile_loadd(2, acc + 32, stride);
    if (Tiles > 3) _tile_loadd(3, acc + 48, stride);
  }
  for (int64_t k = kb; k < ke; k += kKStep) {
    if (prefetch_rows != nullptr)  // the next panel at this k: streams in behind this one
      for (int r = 0; r < kPanel; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(prefetch_rows + r * K + k), _MM_HINT_T0);
    _tile_loadd(4, wn + k, K * 2);
    const uint32_t* xk = xg + (k / kKStep) * 4 * 256;
    _tile_loadd(5, xk, 64);
    _tile_dpbf16ps(0, 4, 5);
    if (Tiles > 1) {
      _tile_loadd(5, xk + 256, 64);
      _tile_dpbf16ps(1, 4, 5);
    }
    if (Tiles > 2) {
      _tile_loadd(5, xk + 512, 64);
      _tile_dpbf16ps(2, 4, 5);
    }
    if (Tiles > 3) {
      _tile_loadd(5, xk + 768, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, acc, stride);
  if (Tiles > 1) _tile_stored(1, acc + 16, stride);
  if (Tiles > 2) _tile_stored(2, acc + 32, stride);
  if (Tiles > 3) _tile_stored(3, acc + 48, stride);
}

// Weight rows [n0, n1) (a multiple of 16) against all T tokens: k-block by k-block, every token
// group, every 16-row panel. The block's weights come from memory on the first group and from
// L2 after it; a group's x slice for the k-block (16 KB) stays in L1.
void block(const uint32_t* xv, const uint16_t* w, uint16_t* y, int64_t T, int64_t K, int64_t N,
           int64_t n0, int64_t n1) {
  const int64_t panels = (n1 - n0) / kPanel, groups = (T + kGroup - 1) / kGroup;
  const int64_t steps = K / kKStep, tile_f32 = kPanel * kGroup;
  thread_local std::vector<float> acc_store;  // [panel][group][16 n][64 t] between k-blocks
  float* acc = aligned(acc_store, panels * groups * tile_f32);
  for (int64_t kb = 0; kb < K; kb += kBlockK) {
    const int64_t ke = std::min(K, kb + kBlockK);
    for (int64_t g = 0; g < groups; ++g) {
      const uint32_t* xg = xv + x_tile(g, 0, steps);
      const int tiles = static_cast<int>(std::min<int64_t>(4, (T - g * kGroup + 15) / 16));
      for (int64_t p = 0; p < panels; ++p) {
        const uint16_t* wn = w + (n0 + p * kPanel) * K;
        const uint16_t* pf = g == 0 && p + 1 < panels ? wn + kPanel * K : nullptr;
        float* pa = acc + (p * groups + g) * tile_f32;
        switch (tiles) {
          case 1: panel_kblock<1>(xg, wn, pa, K, kb, ke, pf); break;
          case 2: panel_kblock<2>(xg, wn, pa, K, kb, ke, pf); break;
          case 3: panel_kblock<3>(xg, wn, pa, K, kb, ke, pf); break;
          default: panel_kblock<4>(xg, wn, pa, K, kb, ke, pf); break;
        }
      }
    }
  }
  // y[t, n0 + 16p : + 16] = column t of the panel's accumulators, rounded to bf16 (RNE)
  const __m512i column = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(static_cast<int>(kGroup)));
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t t = 0; t < T; ++t) {
      const float* pa = acc + (p * groups + t / kGroup) * tile_f32 + t % kGroup;  // [16 n]
      const __m512 v = _mm512_i32gather_ps(column, pa, 4);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + t * N + n0 + p * kPanel),
                          (__m256i)_mm512_cvtneps_pbh(v));
    }
}

void rows(const uint32_t* xv, const uint16_t* w, uint16_t* y, int64_t T, int64_t K, int64_t N,
          int64_t n0, int64_t n1) {
  load_tile_config();
  block(xv, w, y, T, K, N, n0, n1);
  _tile_release();
}

bool request_amx() {
  static const bool ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

ffi::Error AmxMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                     ffi::Result<ffi::AnyBuffer> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("amx_matmul: x [T, K] and w [N, K] must share K");
  if (x.element_type() != ffi::DataType::BF16 || w.element_type() != ffi::DataType::BF16 ||
      y->element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("amx_matmul: x, w and y must be bfloat16");
  const int64_t T = xd[0], K = xd[1], N = wd[0];
  if (T < 1 || K % kKStep != 0 || N % kPanel != 0)
    return ffi::Error::InvalidArgument("amx_matmul: needs T >= 1, K % 32 == 0, N % 16 == 0");
  if (!request_amx())
    return ffi::Error::Internal("amx_matmul: the kernel refused AMX tile permission");
  const int64_t groups = (T + kGroup - 1) / kGroup, Kp = K / 2;
  thread_local std::vector<uint32_t> xv_store;  // packed x, see pack_x (every word written)
  // the pool's threads see this thread's buffer through the pointer
  uint32_t* xv = aligned(xv_store, groups * kGroup * Kp);
  const auto* x32 = static_cast<const uint32_t*>(x.untyped_data());
  jaxserve::ParallelFor(pool, groups, [&](int64_t g) { pack_x(x32, xv, T, Kp, g); });
  const auto* wp = static_cast<const uint16_t*>(w.untyped_data());
  auto* yp = static_cast<uint16_t*>(y->untyped_data());
  // enough items to balance the threads; a block's accumulators fit the per-thread store
  const int64_t block_rows = std::clamp<int64_t>(N / 8 / kPanel * kPanel, kPanel, kBlockRows);
  jaxserve::ParallelFor(pool, (N + block_rows - 1) / block_rows, [&](int64_t i) {
    rows(xv, wp, yp, T, K, N, i * block_rows, std::min(N, (i + 1) * block_rows));
  });
  return ffi::Error::Success();
}

}  // namespace

// 1 when this process may use the AMX tile registers (asks Linux for them once), else 0.
extern "C" int JaxserveAmxReady() { return request_amx() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveCpuAmxMatmul, AmxMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [T, K]
                                  .Arg<ffi::AnyBuffer>()  // w [N, K]
                                  .Ret<ffi::AnyBuffer>());  // y [T, N]
