// bf16 / f32 matmul over a weight packed once at load, for every row count (one decode row up to a
// 512-token prefill chunk), on AVX-512 BF16 CPUs without AMX (AMD Zen 4 / 5), called from the
// jitted step through XLA's FFI.
//
// y[T, N] = x[T, K] . W[N, K]^T, bf16 in, f32 accumulation, each output rounded once to bf16
// (or stored as f32: the lm_head's logits).
// The weight is stored in panels of 16 output columns, pair by pair (packed_matmul.py: pack):
//   wp[P, K2, 16, 2], P = ceil(N / 16), K2 = ceil(K / 2), zero padding;
// wp[p, j] is one 64-byte vector holding the pair (w[n, 2j], w[n, 2j + 1]) of the 16 columns
// n = 16p .. 16p + 15. vdpbf16ps multiplies it with the broadcast pair (x[t, 2j], x[t, 2j + 1])
// of one row: 16 output columns per instruction whatever T is, and x is read in place.
//
// A register block is MR rows x NV panels (MR * NV accumulators, at most 24 of the 32 zmm):
// MR = 8, NV = 3 from 8 rows on; fewer rows take 4 panels; quantized gated steps of 12 rows or
// more take 12 x 2 (kTallRows). Each panel is one contiguous
// stream, prefetched a few lines ahead while the first rows read it; later rows of the same
// block find it in L2. Work items are (group of NV panels, tile of up to 64 rows), over XLA's
// own thread pool. On a 2-core Zen 4 a 512-row step's projections run at 415-455 GFLOP/s
// (XLA's matmul: 380-405) and one row reads its weights at 32-42 GB/s.
//
// The gated form (a GLU's gate and up projections in one call) takes the two weights' panels
// interleaved, gate panel i then up panel i, and stores silu(gate) * up in f32 before the one
// rounding: y[T, M] from wp[2 * ceil(M / 16), K2, 32]; its blocks hold whole (gate, up) pairs.
//
// f32 models take the same kernel on f32 panels, wp[P, K, 16] (16 columns of one k per
// vector, vfmadd instead of vdpbf16ps), y in f32.
//
// int8 and fp8 weights (W8A16, symmetric, one scale per output column) take byte panels laid
// out as the bf16 ones, wp[P, K2, 32] s8 | u8 (float8_e4m3fn bits; 32 bytes per pair vector),
// and their scales s[P, 16] f32. Every int8 and e4m3 value is exact in bf16: a pair vector is
// decoded to bf16 in registers (quant_decode.h: int8 through f32, vpmovsxbd / vcvtdq2ps /
// vcvtne2ps2bf16; e4m3 by moving its bits), so the sums are those of the bf16 kernel on the
// unscaled weights, exact products in f32, and each column's sum is scaled once before the
// one rounding: the weight streams from memory at 1 byte per element. Each register block
// decodes its panels again (a few instructions per 32 weights, against MR * NV vdpbf16ps): on
// the small model's int8 projections, widening a tile's panels once into an L2 buffer for all
// its row blocks was slower (86.9 vs 76.0 ms at 64 rows, 511 vs 508 ms at 512).
// int4 weights (W4A16, symmetric, a scale per column and group of inputs) keep their stored
// bytes, one byte per (column, pair of inputs): wp[P, K/2, 16] u8, each byte the two nibbles
// (value + 8) of inputs 2j and 2j + 1, so a pair vector is 16 bytes; s[P, G, 16] f32. The
// nibbles become bf16 through a 16-entry table (quant_decode.h); each group's sums are scaled
// into totals kept in memory (the registers hold the sums) before the next group.
//
// Quantized panels may come in groups of 8 stored pair step by pair step,
// wp[P / 8, steps, 8, vector_bytes] (packed_matmul.py: group_panels, for short panels): a
// decode row then reads each group as one contiguous stream, where 4 plain panels are 4 short
// streams (14 KB each for an int8 weight of K = 896), which read slowly. A work item is one
// group: 1-3 rows in one block of 8 panels; 4-8 rows in blocks of the usual width, the first
// prefetching the whole group so that the next ones read it from L2. Tall gated steps keep
// their 12 x 2 blocks across the groups (a panel's vectors lie 8 vectors apart).
// 24 weights in one jit on the 2-core Zen 4, one row, plain -> grouped (GB/s, one process):
// int8 gate/up [9728, 896] 27.6 -> 33.4, lm_head [32000, 896] 25.5 -> 30.0, o [896, 896]
// 19.9 -> 24.3; int4 gate/up 19.4 -> 28.3; fp8 gate/up 26.1 -> 30.3. Long panels stay plain:
// the down projection [896, 4864] gained 6% at 1 row and lost 14-20% at 4-16 rows grouped.
//
// Asymmetric weights, w = s * (q - z), add zero points z shaped as the scales: each row's
// sum of x over each input group (the whole row for int8 and fp8) is taken once per call,
// and z times it leaves each group's sums before they are scaled: s * (sum q x - z sum x).
//
// Shapes: x [T, K] bf16; wp [P, K2, 32] bf16 | s8 | u8 (fp8), [P, K/2, 16] u8 (int4), or
// grouped (quantized only) [P / 8, K2, 8, 32] | [P / 8, K/2, 8, 16];
// s [P, 16] f32 (int8, fp8) | [P, G, 16] f32 (int4) | [0]; z like s (asymmetric) | [0];
// y [T, N] bf16 (or f32);
// f32 x: wp [P, K, 16], y f32.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "quant_decode.h"
#include "vec_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace quant = jaxserve::quant;

namespace {

#if defined(JAXSERVE_QUANT_AVX512)  // AVX-512 BF16 (with BW, VL, VNNI, F16C: every such CPU)
constexpr int64_t kRowTile = 64;  // rows per work item
constexpr int64_t kPrefetchBytes = 2048;  // how far ahead each plain panel stream is prefetched
constexpr int64_t kGroupPrefetchBytes = 8192;  // and a group's (4-16 KB: alike; 2 KB: slower)

enum class Weights { kBf16, kF32, kInt8, kFp8, kInt4 };

// What a register block prefetches: nothing (the tile's earlier rows brought its panels to L2),
// its own panels' lines, or every line of its group (the first of several blocks that share
// one group of grouped panels in one work item; the next ones read the group from L2).
enum class Prefetch { kNone, kPanels, kGroup };

// Quantized weights: scales per column (int8, fp8) or per column and input group (int4).
constexpr bool quantized(Weights kind) { return kind >= Weights::kInt8; }
// Bytes per panel vector: 16 columns of a bf16 pair or an f32 value (64), a byte pair (32),
// a pair of nibbles (16).
constexpr int64_t vector_bytes(Weights kind) {
  return kind == Weights::kInt4 ? 16 : quantized(kind) ? 32 : 64;
}

struct Problem {
  const void* x;  // [T, K], bf16 or f32
  const char* w;  // [P, steps, vector_bytes]
  const float* scale;  // quantized: [P, G, 16], each panel's columns per input group; else null
  const float* zero;  // asymmetric: zero points shaped as scale; else null
  const float* xsum;  // asymmetric: [T, G], the sum of each row's x over each input group
  void* y;  // [T, N], bf16 or (f32_out) f32
  bool f32_out;
  int64_t T, K, N, steps;  // steps: vectors per panel, ceil(K / 2) (pairs), K for f32
  int64_t G;  // scale groups along K (int4; 1 otherwise)
  int64_t group;  // panels stored together, pair step by pair step (1: plain panels)
};

// The first vector of panel p; its next ones follow group vectors apart.
inline const char* panel_start(const Problem& pr, int64_t p, int64_t bytes) {
  return pr.w + ((p / pr.group) * pr.steps * pr.group + p % pr.group) * bytes;
}

// The pair (x[t, 2j], x[t, 2j + 1]) of a row as one 32-bit word (rows of an odd K start
// mid-word, hence memcpy).
inline uint32_t x_pair(const uint16_t* row, int64_t j) {
  uint32_t pair;
  std::memcpy(&pair, row + 2 * j, sizeof pair);
  return pair;
}

// Asymmetric weights: acc[m][v] -= z * (row t0 + m's sum of x over input group g), before
// the group's sums are scaled (z of panel p0 + v, group g).
template <int MR, int NV>
inline void subtract_zeros(const Problem& pr, int64_t t0, int64_t p0, int64_t g,
                           __m512 (&acc)[MR][NV]) {
  for (int v = 0; v < NV; ++v) {
    const __m512 zv = _mm512_loadu_ps(pr.zero + ((p0 + v) * pr.G + g) * 16);
    for (int m = 0; m < MR; ++m)
      acc[m][v] = _mm512_fnmadd_ps(zv, _mm512_set1_ps(pr.xsum[(t0 + m) * pr.G + g]), acc[m][v]);
  }
}

// Each row's sum of x over each of G equal input groups: xsum[t, g] (f32 sums of bf16).
void row_group_sums(ffi::ThreadPool& pool, const uint16_t* x, int64_t T, int64_t K, int64_t G,
                    float* xsum) {
  const int64_t size = K / G;  // K when G == 1 (int8, fp8: any K); int4 groups divide K
  jaxserve::ParallelFor(pool, T, [&](int64_t t) {
    for (int64_t g = 0; g < G; ++g) {
      const uint16_t* at = x + t * K + g * size;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = 0; k < size; k += 16) {
        const __mmask16 m = static_cast<__mmask16>(size - k >= 16 ? 0xffff
                                                                   : (1u << (size - k)) - 1);
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(
                                     _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, at + k)),
                                     16)));
      }
      xsum[t * G + g] = _mm512_reduce_add_ps(sum);
    }
  });
}

// Rows [t0, t0 + MR) x panels [p0, p0 + NV). prefetch: the first rows to read these panels.
// GLU: panels are (gate, up) pairs, output columns 16 * (p0 + v) / 2 + [0, 16). kF32: x and the
// panels are f32 (one k per vector, vfmadd) instead of bf16 pairs (vdpbf16ps); kInt8 / kFp8 /
// kInt4: pairs decoded to bf16 as they are read (quant_decode.h), each column scaled before the
// store (int4: each group's sums, into total).
template <int MR, int NV, bool GLU, Weights W>
void block(const Problem& pr, int64_t t0, int64_t p0, Prefetch prefetch) {
  constexpr bool F32 = W == Weights::kF32;
  constexpr int64_t kBytes = vector_bytes(W);
  using X = std::conditional_t<F32, float, uint16_t>;
  auto load = [](const char* at) {
    const auto* b = reinterpret_cast<const uint8_t*>(at);
    if constexpr (W == Weights::kInt8) return (__m512)quant::decode<quant::kInt8>(b, 0, 32);
    else if constexpr (W == Weights::kFp8) return (__m512)quant::decode<quant::kFp8>(b, 0, 32);
    else if constexpr (W == Weights::kInt4) return (__m512)quant::decode<quant::kInt4>(b, 0, 32);
    else return _mm512_loadu_ps(at);
  };
  // int4: each input group's sums are scaled into totals (memory: the registers hold acc)
  constexpr bool kGrouped = W == Weights::kInt4;
  alignas(64) float total[kGrouped ? MR * NV * 16 : 1];
  if constexpr (kGrouped) std::memset(total, 0, sizeof total);
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  const char* panel[NV];
  for (int v = 0; v < NV; ++v) panel[v] = panel_start(pr, p0 + v, kBytes);
  const int64_t stride = pr.group * kBytes;  // from one pair step of a panel to the next
  // prefetched once per cache line, a whole number of pair steps ahead (the same panels)
  const bool own = prefetch == Prefetch::kPanels, wide = prefetch == Prefetch::kGroup;
  const int64_t ahead =
      pr.group == 1 ? kPrefetchBytes : std::max<int64_t>(1, kGroupPrefetchBytes / stride) * stride;
  const X* row[MR];
  for (int m = 0; m < MR; ++m) row[m] = static_cast<const X*>(pr.x) + (t0 + m) * pr.K;
  const int64_t full = F32 ? pr.K : pr.K / 2;  // whole vectors (an odd K's last pair aside)
  const int64_t groups = kGrouped ? pr.G : 1, group_steps = full / groups;
  for (int64_t g = 0; g < groups; ++g) {
    if constexpr (kGrouped)
      for (int m = 0; m < MR; ++m)
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
    for (int64_t j = g * group_steps; j < (g + 1) * group_steps; ++j) {
      __m512 wv[NV];
      if (wide)
        for (int64_t off = 0; off < stride; off += 64)
          _mm_prefetch(panel[0] + j * stride + off + ahead, _MM_HINT_T0);
      for (int v = 0; v < NV; ++v) {
        const char* at = panel[v] + j * stride;
        if (own && (reinterpret_cast<uintptr_t>(at) & 63) < kBytes)
          _mm_prefetch(at + ahead, _MM_HINT_T0);
        wv[v] = load(at);
      }
      for (int m = 0; m < MR; ++m) {
        if constexpr (F32) {
          const __m512 xb = _mm512_set1_ps(row[m][j]);
          for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(wv[v], xb, acc[m][v]);
        } else {
          const __m512bh xb =
              (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(x_pair(row[m], j)));
          for (int v = 0; v < NV; ++v)
            acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)wv[v], xb);
        }
      }
    }
    if constexpr (kGrouped) {
      if (pr.zero) subtract_zeros<MR, NV>(pr, t0, p0, g, acc);
      for (int v = 0; v < NV; ++v) {
        const __m512 sv = _mm512_loadu_ps(pr.scale + ((p0 + v) * pr.G + g) * 16);
        for (int m = 0; m < MR; ++m) {
          float* t = total + (m * NV + v) * 16;
          _mm512_store_ps(t, _mm512_fmadd_ps(acc[m][v], sv, _mm512_load_ps(t)));
        }
      }
    }
  }
  if (!F32 && pr.K % 2) {  // odd K: the last pair is (x[t, K - 1], 0) against (w[n, K - 1], 0)
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<uint16_t>(row[m][pr.K - 1]));
      for (int v = 0; v < NV; ++v) {
        const __m512bh wl = (__m512bh)load(panel[v] + full * stride);
        acc[m][v] = _mm512_dpbf16_ps(acc[m][v], wl, xb);
      }
    }
  }
  if constexpr (quantized(W) && !kGrouped) {
    if (pr.zero) subtract_zeros<MR, NV>(pr, t0, p0, 0, acc);
  }
  constexpr int kStep = GLU ? 2 : 1;  // panels per 16 output columns
  for (int v = 0; v < NV; v += kStep) {
    const int64_t n = (p0 + v) / kStep * 16, live = std::min<int64_t>(16, pr.N - n);
    const __mmask16 mask = static_cast<__mmask16>((1u << live) - 1);
    __m512 scale[kStep];
    if constexpr (quantized(W) && !kGrouped)
      for (int i = 0; i < kStep; ++i) scale[i] = _mm512_loadu_ps(pr.scale + (p0 + v + i) * 16);
    for (int m = 0; m < MR; ++m) {
      __m512 out = acc[m][v], up = acc[m][v + kStep - 1];
      if constexpr (kGrouped) {  // already scaled, group by group
        out = _mm512_load_ps(total + (m * NV + v) * 16);
        up = _mm512_load_ps(total + (m * NV + v + kStep - 1) * 16);
      } else if constexpr (quantized(W)) {
        out = _mm512_mul_ps(out, scale[0]);
        up = _mm512_mul_ps(up, scale[kStep - 1]);
      }
      if constexpr (GLU) out = _mm512_mul_ps(jaxserve::silu16(out), up);
      const int64_t at = (t0 + m) * pr.N + n;
      if (pr.f32_out)
        _mm512_mask_storeu_ps(static_cast<float*>(pr.y) + at, mask, out);
      else
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(pr.y) + at, mask,
                                 (__m256i)_mm512_cvtneps_pbh(out));
    }
  }
}

// Quantized gated steps of at least this many rows take blocks of kTallRows rows x one (gate,
// up) pair of panels: each panel vector is decoded once per 12 rows instead of once per 6 (the
// 6 x 4 blocks). On the small model's int8 gate/up ([896 -> 2 x 4864], 6 layers in one jit,
// interleaved) a layer took 3.40 against 3.92 ms at 64 rows and 12.60 against 14.33 ms at 256
// (int4: 1.02-1.08x). Ungated projections keep 8 x 3: 12 x 2 was 3-14% slower there (more
// activation rows streamed per panel, for fewer decodes saved).
constexpr int kTallRows = 12;
constexpr int kGluRows = 6;  // rows of every other gated block (4 panels: two gate/up pairs)
constexpr int kGroup = 8;  // panels per group of grouped panels

// Panels per block of mr rows: at most 24 accumulators; 4 panels (two gate/up pairs) up to 6
// rows, 3 from 7 rows on (a decode row reads at memory speed with any of these).
constexpr int panels_for(int mr) { return mr <= 6 ? 4 : 3; }

// The last group of panels may be narrower (nv < NV); a GLU's groups are whole pairs.
template <int MR, bool GLU, Weights W, int NV = panels_for(MR)>
void block_nv(const Problem& pr, int64_t t0, int64_t p0, int nv, Prefetch prefetch) {
  constexpr int kStep = GLU ? 2 : 1;
  if constexpr (NV > kStep) {
    if (nv < NV) return block_nv<MR, GLU, W, NV - kStep>(pr, t0, p0, nv, prefetch);
  }
  block<MR, NV, GLU, W>(pr, t0, p0, prefetch);
}

template <bool GLU, Weights W>
void block_any(const Problem& pr, int64_t t0, int mr, int64_t p0, int nv,
               Prefetch prefetch) {
  if constexpr (quantized(W)) {
    if (nv == kGroup) {  // one whole group of grouped panels, up to 8 rows
      switch (mr) {
        case 1: return block<1, kGroup, GLU, W>(pr, t0, p0, prefetch);
        case 2: return block<2, kGroup, GLU, W>(pr, t0, p0, prefetch);
        case 3: return block<3, kGroup, GLU, W>(pr, t0, p0, prefetch);
        default: {  // blocks of the usual width, the first prefetching the whole group
          const Prefetch first = prefetch == Prefetch::kNone ? prefetch : Prefetch::kGroup;
          for (int q = 0, w = panels_for(mr); q < kGroup; q += w)
            block_any<GLU, W>(pr, t0, mr, p0 + q, std::min(w, kGroup - q),
                              q == 0 ? first : Prefetch::kNone);
          return;
        }
      }
    }
  }
  switch (mr) {
    case 1: return block_nv<1, GLU, W>(pr, t0, p0, nv, prefetch);
    case 2: return block_nv<2, GLU, W>(pr, t0, p0, nv, prefetch);
    case 3: return block_nv<3, GLU, W>(pr, t0, p0, nv, prefetch);
    case 4: return block_nv<4, GLU, W>(pr, t0, p0, nv, prefetch);
    case 5: return block_nv<5, GLU, W>(pr, t0, p0, nv, prefetch);
    case 6: return block_nv<6, GLU, W>(pr, t0, p0, nv, prefetch);
    case kTallRows:  // a tall step's whole block: one (gate, up) pair of panels (see Run)
      if constexpr (GLU && quantized(W)) return block<kTallRows, 2, GLU, W>(pr, t0, p0, prefetch);
      [[fallthrough]];
    default:
      if constexpr (GLU) {  // other gated blocks hold at most 6 rows: the rows of a tall
        // step's last block of a tile (7 to 11) go as 6 + the rest
        block_nv<kGluRows, GLU, W>(pr, t0, p0, nv, prefetch);
        return block_any<GLU, W>(pr, t0 + kGluRows, mr - kGluRows, p0, nv, Prefetch::kNone);
      } else {
        if (mr == 7) return block_nv<7, GLU, W>(pr, t0, p0, nv, prefetch);
        return block_nv<8, GLU, W>(pr, t0, p0, nv, prefetch);
      }
  }
}

// The row blocks of one work item: rows [t_begin, t_end) x panels [p0, p0 + nv).
template <bool GLU>
void run_tile(const Problem& pr, Weights kind, int mr, int64_t p0, int nv, int64_t t_begin,
              int64_t t_end) {
  for (int64_t t0 = t_begin; t0 < t_end; t0 += mr) {
    const int rows = static_cast<int>(std::min<int64_t>(mr, t_end - t0));
    const Prefetch prefetch = t0 == t_begin ? Prefetch::kPanels : Prefetch::kNone;
    switch (kind) {
      case Weights::kBf16: block_any<GLU, Weights::kBf16>(pr, t0, rows, p0, nv, prefetch); break;
      case Weights::kF32: block_any<GLU, Weights::kF32>(pr, t0, rows, p0, nv, prefetch); break;
      case Weights::kInt8: block_any<GLU, Weights::kInt8>(pr, t0, rows, p0, nv, prefetch); break;
      case Weights::kFp8: block_any<GLU, Weights::kFp8>(pr, t0, rows, p0, nv, prefetch); break;
      case Weights::kInt4: block_any<GLU, Weights::kInt4>(pr, t0, rows, p0, nv, prefetch); break;
    }
  }
}

// y = x . W^T (GLU: silu(x . Wg^T) * (x . Wu^T)) for the packed wp; checks the shapes (see
// the top of the file): the weights' kind follows from wp's dtype and last dimension.
template <bool GLU>
ffi::Error Run(ffi::ThreadPool& pool, ffi::AnyBuffer& x, ffi::AnyBuffer& w, ffi::AnyBuffer& s,
               ffi::AnyBuffer& z, ffi::AnyBuffer& y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y.dimensions();
  const bool f32 = x.element_type() == ffi::DataType::F32;
  const bool u8 = w.element_type() == ffi::DataType::U8;
  // plain panels wp [P, steps, width], or grouped [P / group, steps, group, width]
  const bool grouped = wd.size() == 4;
  const int64_t width = wd.size() >= 3 ? wd[wd.size() - 1] : 0, group = grouped ? wd[2] : 1;
  const int64_t P = wd.size() == 0 ? 0 : wd[0] * group;
  const bool lanes = width == 16;  // f32 values, or int4 nibble pairs
  const Weights kind = f32 ? Weights::kF32
                       : w.element_type() == ffi::DataType::S8 ? Weights::kInt8
                       : u8 ? (lanes ? Weights::kInt4 : Weights::kFp8) : Weights::kBf16;
  const bool bytes = quantized(kind);
  const auto elem = f32 ? ffi::DataType::F32 : ffi::DataType::BF16;
  const bool f32_out = f32 || (!GLU && y.element_type() == ffi::DataType::F32);
  if ((!f32 && x.element_type() != ffi::DataType::BF16) || (w.element_type() != elem && !bytes) ||
      (bytes && f32) ||
      y.element_type() != (f32_out ? ffi::DataType::F32 : ffi::DataType::BF16))
    return ffi::Error::InvalidArgument(
        "packed_matmul: x and wp both bfloat16 (y bfloat16, or float32 ungated), x bfloat16 "
        "and wp int8 or uint8 (fp8 bits, int4 nibble pairs), or both float32 (y float32)");
  if (xd.size() != 2 || (wd.size() != 3 && !grouped) || yd.size() != 2 || yd[0] != xd[0] ||
      width != (f32 || kind == Weights::kInt4 ? 16 : 32))
    return ffi::Error::InvalidArgument(
        "packed_matmul: x [T, K], wp [ceil(N/16), ceil(K/2), 32] (f32: [ceil(N/16), K, 16]; "
        "int4: [ceil(N/16), K/2, 16]) and y [T, N]");
  if (grouped && (!bytes || group != kGroup))
    return ffi::Error::InvalidArgument(
        "packed_matmul: grouped panels [P / 8, steps, 8, width] hold quantized weights");
  const int64_t T = xd[0], K = xd[1], N = yd[1];
  const int64_t steps = f32 ? K : (K + 1) / 2;
  if (P != (GLU ? 2 : 1) * ((N + 15) / 16) || wd[1] != steps ||
      (kind == Weights::kInt4 && K % 2))
    return ffi::Error::InvalidArgument("packed_matmul: wp is not the packed [N, K] weight");
  const int64_t n_scales = static_cast<int64_t>(s.element_count());
  const int64_t G = bytes ? n_scales / (P * 16) : 1;
  if (s.element_type() != ffi::DataType::F32 ||
      (bytes ? G < 1 || n_scales != P * 16 * G || steps % G ||
                   (kind != Weights::kInt4 && G != 1)
             : n_scales != 0))
    return ffi::Error::InvalidArgument(
        "packed_matmul: s must be float32 [P, 16] for int8 / fp8 panels, [P, G, 16] for int4 "
        "(G groups of an even size dividing K), else empty");
  const bool asymmetric = z.element_count() != 0;
  if (asymmetric && (!bytes || z.element_type() != ffi::DataType::F32 ||
                     static_cast<int64_t>(z.element_count()) != n_scales))
    return ffi::Error::InvalidArgument(
        "packed_matmul: z (zero points) must be empty, or float32 shaped as s for quantized "
        "panels");
  if (T < 1 || K < 1 || N < 1 || T * K >= (int64_t{1} << 31))
    return ffi::Error::InvalidArgument("packed_matmul: 1 <= T, K, N and T * K < 2^31");
  std::vector<float> xsum(asymmetric ? T * G : 0);  // [T, G]
  if (asymmetric)
    row_group_sums(pool, static_cast<const uint16_t*>(x.untyped_data()), T, K, G, xsum.data());
  const Problem pr{x.untyped_data(), static_cast<const char*>(w.untyped_data()),
                   bytes ? static_cast<const float*>(s.untyped_data()) : nullptr,
                   asymmetric ? static_cast<const float*>(z.untyped_data()) : nullptr,
                   asymmetric ? xsum.data() : nullptr,
                   y.untyped_data(), f32_out, T, K, N, steps, G, group};
  const bool tall = GLU && bytes && T >= kTallRows;
  const int mr = tall ? kTallRows : static_cast<int>(std::min<int64_t>(T, GLU ? kGluRows : 8));
  // grouped panels: a work item is one whole group (one stream), but for tall gated steps
  const int nv = tall ? 2 : grouped ? kGroup : panels_for(mr);
  const int64_t groups = (P + nv - 1) / nv, tiles = (T + kRowTile - 1) / kRowTile;
  jaxserve::ParallelFor(pool, groups * tiles, [&](int64_t i) {
    const int64_t p0 = (i / tiles) * nv, t_begin = (i % tiles) * kRowTile;
    const int g_nv = static_cast<int>(std::min<int64_t>(nv, P - p0));
    run_tile<GLU>(pr, kind, mr, p0, g_nv, t_begin, std::min(T, t_begin + kRowTile));
  });
  return ffi::Error::Success();
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer s,
                  ffi::AnyBuffer z, ffi::Result<ffi::AnyBuffer> y) {
  return Run<false>(pool, x, w, s, z, *y);
}

ffi::Error GluMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer s,
                     ffi::AnyBuffer z, ffi::Result<ffi::AnyBuffer> y) {
  return Run<true>(pool, x, w, s, z, *y);
}
#else
ffi::Error Matmul(ffi::ThreadPool, ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer,
                  ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>) {
  return ffi::Error::Internal("packed_matmul: built for a CPU without AVX-512 BF16");
}
ffi::Error GluMatmul(ffi::ThreadPool, ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer,
                     ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>) {
  return ffi::Error::Internal("packed_matmul: built for a CPU without AVX-512 BF16");
}
#endif

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveCpuPackedMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [T, K]
                                  .Arg<ffi::AnyBuffer>()  // wp [ceil(N/16), ceil(K/2), 32], grouped
                                  .Arg<ffi::AnyBuffer>()  // s [ceil(N/16), 16] | [0]
                                  .Arg<ffi::AnyBuffer>()  // z (zero points) like s | [0]
                                  .Ret<ffi::AnyBuffer>());  // y [T, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveCpuPackedGluMatmul, GluMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [T, K]
                                  .Arg<ffi::AnyBuffer>()  // wp [2 ceil(M/16), ceil(K/2), 32]
                                  .Arg<ffi::AnyBuffer>()  // s [2 ceil(M/16), 16] | [0]
                                  .Arg<ffi::AnyBuffer>()  // z (zero points) like s | [0]
                                  .Ret<ffi::AnyBuffer>());  // y [T, M]
