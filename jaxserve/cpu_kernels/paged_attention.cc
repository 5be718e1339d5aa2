// Ragged paged attention for the CPU, called from the jitted step through XLA's FFI.
//
// One call per layer does what the XLA path does in a scatter plus a blockwise loop:
//   1. writes this step's K/V rows into their cache slots (the cache buffers are aliased to the
//      outputs, so with a donated cache they are written in place);
//   2. attends every real query token (decode rows and prefill chunks alike) over its
//      sequence's pages, causal, with an optional sliding window and logits soft cap.
// Work items are (sequence, tile of up to kTile query tokens, kv head); the G query heads of a
// kv head share each K/V page read (GQA). Pages are widened to f32 one block at a time and the
// softmax is online per block; an item of one query token (every decode row) takes three passes
// over its context instead (attend_token), without the per-block rescaling. Keys past a
// sequence's length are never read, so whatever the unused slots hold (NaN included) cannot
// reach the output; padding tokens get zeros.
//
// K pages are stored transposed inside each block so a block's scores are a few wide vector
// ops with no transpose at read time: key o, dim i of a block sits at ((i / P) * bs + o) * P +
// i % P, with P = 2 for bf16 (pairs of dims, the operand of AVX-512 BF16's dot product) and P = 1
// for f32. V pages keep [bs, D]. Only this kernel reads or writes pages laid out this way: the
// engine picks one attention backend for its whole life.
//
// Quantized pages (kv_cache_dtype int8 / fp8: int8, or uint8 holding float8_e4m3fn bits) have
// rows of head_dim + 4 bytes, as jaxserve/layers/kv_quant.py allocates them; this kernel lays a
// block of bs * (D + 4) bytes out as: K values transposed in pairs of dims as bf16's (key o,
// dim i at byte ((i / 2) * bs + o) * 2 + i % 2; widened to bf16 they are the operand of the
// AVX-512 BF16 dot product), then the bs keys' f32 scales; V rows as kv_quant.py writes them (key o at o * (D + 4): its D values,
// then its f32 scale). Each token's K/V is quantized here as kv_quant.quantize_tokens does, bit
// for bit (kv_quant.h); attention widens one block at a time (K unscaled: scores =
// (q . k) * k_scale; V times its scales), never a full-precision copy of the cache.
//
// Shapes: q [T, Hq, D]; k_new, v_new [T, Hkv, D]; k_pages, v_pages [Hkv, NB, bs, D] (float) or
// [Hkv, NB, bs, D + 4] (quantized); slot_mapping [T]; block_tables [S, W]; seq_lens [S];
// query_start_loc [S + 1]; out [T, Hq, D]. q, k_new, v_new and out share one dtype, bf16 or
// f32; float pages have it too.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_block_math.h"
#include "kv_quant.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace jaxserve::attn;  // NOLINT: the per-block math

namespace {

constexpr int kTile = 16;  // query tokens per work item
constexpr int kMaxHeadDim = 1024;

struct Dims {
  int64_t tokens, q_heads, kv_heads, head_dim, num_blocks, block_size, seqs, width;
};

struct WorkItem {
  int32_t seq, first, count, kv_head;  // query tokens [first, first + count) of `seq`
};

template <typename T>
constexpr int64_t kPair = sizeof(T) == 2 ? 2 : 1;  // dims packed together in the K layout

template <typename T>
void write_kv(const Dims& d, const T* k_new, const T* v_new, const int32_t* slots, T* k_pages,
              T* v_pages) {
  const int64_t slots_per_head = d.num_blocks * d.block_size, bs = d.block_size, D = d.head_dim;
  constexpr int64_t P = kPair<T>;
  for (int64_t t = 0; t < d.tokens; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0 || slot >= slots_per_head) continue;  // validated by the caller; never write OOB
    const int64_t block = slot / bs, o = slot % bs;
    for (int64_t h = 0; h < d.kv_heads; ++h) {
      const int64_t page = (h * d.num_blocks + block) * bs * D;
      const int64_t src = (t * d.kv_heads + h) * D;
      std::memcpy(v_pages + page + o * D, v_new + src, D * sizeof(T));
      for (int64_t i = 0; i < D; ++i) k_pages[page + ((i / P) * bs + o) * P + i % P] = k_new[src + i];
    }
  }
}

// Scratch of one thread: query rows (Q: the query's dtype), accumulators, one block of V in
// f32; quantized pages also widen one block of K (kt, in Q: bf16 pairs [D/2, bs, 2] for
// block_scores' dot product, or f32 [D, bs] through `wide`) and keep its scales (ks).
template <typename Q>
struct Scratch {
  std::vector<Q> q, kt;
  std::vector<float> acc, m, l, v, wide, ks;
  void fit(int64_t rows, int64_t head_dim, int64_t block_size, bool quantized) {
    q.resize((rows + kRows) * head_dim);  // + a group's worth of zero rows past the end
    acc.resize(rows * head_dim);
    m.resize(rows);
    l.resize(rows);
    v.resize(block_size * head_dim);
    if (quantized) {
      kt.resize(block_size * head_dim);
      wide.resize(block_size * head_dim);
      ks.resize(block_size);
    }
  }
};

// Float pages (bf16 / f32, the query's dtype): K read in place, V rows widened to f32.
template <typename T>
struct FloatPages {
  using Q = T;
  static constexpr bool kQuantized = false;
  const T* k;
  const T* v;
  int64_t D, bs;
  int64_t block_elems() const { return bs * D; }
  // The K block at element offset `page` for block_scores.
  const T* load_k(int64_t page, Scratch<T>&) const { return k + page; }
  // V rows [lo, hi) of that block, widened to f32 into dst (row j at dst + j * D).
  void load_v(int64_t page, int64_t lo, int64_t hi, float* dst) const {
    for (int64_t i = lo * D; i < hi * D; ++i) dst[i] = load(v, page + i);
  }
  void scale_scores(float*, const Scratch<T>&) const {}
};

// Quantized pages (int8 / e4m3 bytes, f32 scales; layout in the header comment), queries in Q
// (bf16 or f32): a block's K values are widened unscaled (scores = (q . k) * k_scale; int8 and
// e4m3 values are exact in bf16), its V rows widened to f32 and scaled.
template <typename Codec, typename Q_>
struct QuantPages {
  using Q = Q_;
  static constexpr bool kQuantized = true;
  const uint8_t* k;
  const uint8_t* v;
  int64_t D, bs;
  int64_t block_elems() const { return bs * (D + jaxserve::kvq::kScaleBytes); }
  // The block's K values widened (unscaled) into sc.kt, its scales into sc.ks.
  const Q* load_k(int64_t page, Scratch<Q>& sc) const {
    const uint8_t* kb = k + page;  // all bs keys: those past n are masked (they may be NaN)
    widen_k(kb, sc);
    std::memcpy(sc.ks.data(), kb + bs * D, bs * sizeof(float));
    return sc.kt.data();
  }
  // V rows [lo, hi) widened and scaled into dst (row j at dst + j * D); others never read.
  void load_v(int64_t page, int64_t lo, int64_t hi, float* dst) const {
    const int64_t row = D + jaxserve::kvq::kScaleBytes;
    for (int64_t j = lo; j < hi; ++j) {
      const uint8_t* vr = v + page + j * row;
      float s;
      std::memcpy(&s, vr + D, sizeof s);
      Codec::widen_n(vr, D, dst + j * D, s);
    }
  }
  void widen_k(const uint8_t* kb, Scratch<uint16_t>& sc) const {  // pairs, as stored
    jaxserve::kvq::widen_bf16_n<Codec>(kb, bs * D, sc.kt.data());
  }
  void widen_k(const uint8_t* kb, Scratch<float>& sc) const {  // pairs -> [D, bs]
    Codec::widen_n(kb, bs * D, sc.wide.data(), 1.0f);
    for (int64_t p = 0; p < D / 2; ++p)
      for (int64_t o = 0; o < bs; ++o) {
        sc.kt[2 * p * bs + o] = sc.wide[(p * bs + o) * 2];
        sc.kt[(2 * p + 1) * bs + o] = sc.wide[(p * bs + o) * 2 + 1];
      }
  }
  void scale_scores(float* s, const Scratch<Q>& sc) const {
#pragma omp simd
    for (int64_t j = 0; j < bs; ++j) s[j] *= sc.ks[j];
  }
};

// Widens (or copies) one query row of T into the scratch's dtype Q.
template <typename Q, typename T>
inline void load_row(Q* dst, const T* src, int64_t D) {
  if constexpr (std::is_same_v<Q, T>) {
    std::memcpy(dst, src, D * sizeof(T));
  } else {
    for (int64_t i = 0; i < D; ++i) dst[i] = load(src, i);
  }
}

template <typename T, typename Pages>
void attend(const Dims& d, const Params& p, const WorkItem& w, const T* q, const Pages& pages,
            const int32_t* block_tables, const int32_t* seq_lens, const int32_t* qsl, T* out,
            Scratch<typename Pages::Q>& sc) {
  using Q = typename Pages::Q;
  const int64_t D = d.head_dim, bs = d.block_size, G = d.q_heads / d.kv_heads;
  const int64_t rows = static_cast<int64_t>(w.count) * G;  // row r: token r / G, head r % G
  sc.fit(rows, D, bs, Pages::kQuantized);
  const int64_t seq_len = seq_lens[w.seq];
  const int64_t qlen = qsl[w.seq + 1] - qsl[w.seq];
  const int64_t pos0 = seq_len - qlen + w.first;  // position of the tile's first query token
  const int64_t tok0 = qsl[w.seq] + w.first;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = tok0 + r / G, h = w.kv_head * G + r % G;
    load_row(&sc.q[r * D], q + (t * d.q_heads + h) * D, D);
    sc.m[r] = -std::numeric_limits<float>::infinity();
    sc.l[r] = 0.0f;
  }
  std::fill(sc.q.begin() + rows * D, sc.q.end(), Q(0));
  std::fill(sc.acc.begin(), sc.acc.begin() + rows * D, 0.0f);
  const int64_t key_end = std::min<int64_t>(seq_len, pos0 + w.count);  // exclusive
  int64_t key_begin = 0;
  if (p.window > 0) key_begin = std::max<int64_t>(0, pos0 - p.window + 1);
  const int32_t* table = block_tables + static_cast<int64_t>(w.seq) * d.width;
  const int64_t head_base = static_cast<int64_t>(w.kv_head) * d.num_blocks * pages.block_elems();
  float s[kRows][kMaxBlock];
  for (int64_t b = key_begin / bs; b * bs < key_end; ++b) {
    const int64_t start = b * bs, n = std::min<int64_t>(bs, key_end - start);
    // Keys past the sequence get scores (of whatever their slots hold) that are masked away,
    // and their V rows are never read.
    const int64_t page = head_base + table[b] * pages.block_elems();
    pages.load_v(page, 0, n, sc.v.data());
    const Q* kt = pages.load_k(page, sc);
    // Causal: rows whose token comes before this block's first key see nothing in it.
    const int64_t first_row = std::max<int64_t>(0, start - pos0) * G;
    for (int64_t r0 = first_row; r0 < rows; r0 += kRows) {
      block_scores(&sc.q[r0 * D], kRows, kt, D, bs, s);
      for (int64_t r = r0; r < std::min<int64_t>(rows, r0 + kRows); ++r) {
        pages.scale_scores(s[r - r0], sc);
        const float corr = softmax_block(s[r - r0], bs, n, start, pos0 + r / G, p, sc.m[r], sc.l[r]);
        if (corr >= 0.0f) accumulate(&sc.acc[r * D], corr, s[r - r0], sc.v.data(), n, D);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = tok0 + r / G, h = w.kv_head * G + r % G;
    const float inv = sc.l[r] > 0.0f ? 1.0f / sc.l[r] : 0.0f;
    for (int64_t i = 0; i < D; ++i) store(out, (t * d.q_heads + h) * D + i, sc.acc[r * D + i] * inv);
  }
}

// One query token (a decode row, or a 1-token tail of a chunk): its G query heads against the
// context in three passes, where `attend` runs an online softmax block by block. Pass 1 scores
// every visible key, pass 2 takes one max and one sum per row, pass 3 adds up p . V. The
// online form paid, per block and row, two horizontal reductions, a scalar exp and a rescale
// of the accumulator: most of a decode's time at a few hundred keys, where the work per block
// is small. Scores of the whole context sit in a thread-local buffer (rows x keys floats).
template <typename T, typename Pages>
void attend_token(const Dims& d, const Params& p, const WorkItem& w, const T* q, const Pages& pages,
                  const int32_t* block_tables, const int32_t* seq_lens, const int32_t* qsl, T* out,
                  Scratch<typename Pages::Q>& scr) {
  using Q = typename Pages::Q;
  const int64_t D = d.head_dim, bs = d.block_size, G = d.q_heads / d.kv_heads;
  const int64_t seq_len = seq_lens[w.seq];
  const int64_t qpos = seq_len - (qsl[w.seq + 1] - qsl[w.seq]) + w.first;
  const int64_t tok = qsl[w.seq] + w.first;
  const int64_t key_end = std::min<int64_t>(seq_len, qpos + 1);  // exclusive
  const int64_t key_begin = p.window > 0 ? std::max<int64_t>(0, qpos - p.window + 1) : 0;
  const int64_t b0 = key_begin / bs, b1 = (key_end + bs - 1) / bs;  // blocks [b0, b1)
  const int64_t span = (b1 - b0) * bs;  // score columns: keys from b0 * bs
  scr.fit(kRows, D, bs, Pages::kQuantized);  // its q rows, V block and (quantized) K block
  thread_local std::vector<float> sc, acc;
  sc.resize(kRows * span);
  acc.resize(kRows * D);
  Q* qr = scr.q.data();
  float* vf = scr.v.data();
  const int32_t* table = block_tables + static_cast<int64_t>(w.seq) * d.width;
  const int64_t head_base = static_cast<int64_t>(w.kv_head) * d.num_blocks * pages.block_elems();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float blk[kRows][kMaxBlock];
  for (int64_t g0 = 0; g0 < G; g0 += kRows) {
    const int64_t nr = std::min<int64_t>(kRows, G - g0);
    std::fill(qr, qr + kRows * D, Q(0));
    for (int64_t r = 0; r < nr; ++r)
      load_row(qr + r * D, q + (tok * d.q_heads + w.kv_head * G + g0 + r) * D, D);
    float mx[kRows], inv[kRows];
    std::fill(mx, mx + kRows, neg_inf);
    // pass 1: scaled (and capped) scores; keys outside [key_begin, key_end) get -inf, so a NaN
    // in an unwritten slot never passes
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t page = head_base + static_cast<int64_t>(table[b]) * pages.block_elems();
      block_scores(qr, kRows, pages.load_k(page, scr), D, bs, blk);
      const int64_t start = b * bs;
      for (int64_t r = 0; r < nr; ++r) {
        pages.scale_scores(blk[r], scr);
        float* sr = &sc[r * span + (b - b0) * bs];
        mx[r] = masked_scores(blk[r], sr, bs, start, key_begin, key_end, p, mx[r]);
      }
    }
    // pass 2: probabilities (unnormalised) and their sum
    for (int64_t r = 0; r < nr; ++r) {  // a row with no visible key gets zeros
      const float sum = exp_sum(&sc[r * span], span, mx[r]);
      inv[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
    std::fill(sc.begin() + nr * span, sc.end(), 0.0f);  // rows past G: zero weights in pass 3
    // pass 3: p . V over the visible keys only (V rows of other slots are never read)
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * bs;
      const int64_t lo = std::max<int64_t>(0, key_begin - start);
      const int64_t hi = std::min<int64_t>(bs, key_end - start);
      pages.load_v(head_base + static_cast<int64_t>(table[b]) * pages.block_elems(), lo, hi, vf);
      const float* pb = &sc[(b - b0) * bs];  // row r's probabilities at pb[r * span + j]
#if defined(__AVX512F__)
      if (D % 16 == 0) {
        for (int64_t c = 0; c < D; c += 16) {
          __m512 a[kRows];
          for (int r = 0; r < kRows; ++r) a[r] = _mm512_loadu_ps(&acc[r * D + c]);
          for (int64_t j = lo; j < hi; ++j) {
            const __m512 vj = _mm512_loadu_ps(&vf[j * D + c]);
            for (int r = 0; r < kRows; ++r)
              a[r] = _mm512_fmadd_ps(_mm512_set1_ps(pb[r * span + j]), vj, a[r]);
          }
          for (int r = 0; r < kRows; ++r) _mm512_storeu_ps(&acc[r * D + c], a[r]);
        }
        continue;
      }
#endif
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t j = lo; j < hi; ++j) {
          const float pj = pb[r * span + j];
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) acc[r * D + i] += pj * vf[j * D + i];
        }
    }
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t o = (tok * d.q_heads + w.kv_head * G + g0 + r) * D;
      for (int64_t i = 0; i < D; ++i) store(out, o + i, acc[r * D + i] * inv[r]);
    }
  }
}

// Quantizes this step's K/V rows (q's dtype T) into their slots: K values transposed inside the
// block and its scales after them, V rows values + scale (see the header comment).
template <typename Codec, typename T>
void write_kv_quant(const Dims& d, const T* k_new, const T* v_new, const int32_t* slots,
                    uint8_t* k_pages, uint8_t* v_pages) {
  const int64_t slots_per_head = d.num_blocks * d.block_size, bs = d.block_size, D = d.head_dim;
  const int64_t row = D + jaxserve::kvq::kScaleBytes, block_bytes = bs * row;
  float x[kMaxHeadDim];
  uint8_t values[kMaxHeadDim];
  for (int64_t t = 0; t < d.tokens; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0 || slot >= slots_per_head) continue;  // validated by the caller; never write OOB
    const int64_t block = slot / bs, o = slot % bs;
    for (int64_t h = 0; h < d.kv_heads; ++h) {
      uint8_t* kb = k_pages + (h * d.num_blocks + block) * block_bytes;
      uint8_t* vr = v_pages + (h * d.num_blocks + block) * block_bytes + o * row;
      const int64_t src = (t * d.kv_heads + h) * D;
      for (int64_t i = 0; i < D; ++i) x[i] = load(k_new, src + i);
      float scale = jaxserve::kvq::quantize_row<Codec>(x, D, values);
      for (int64_t i = 0; i < D; ++i) kb[((i / 2) * bs + o) * 2 + i % 2] = values[i];
      std::memcpy(kb + bs * D + o * sizeof(float), &scale, sizeof scale);
      for (int64_t i = 0; i < D; ++i) x[i] = load(v_new, src + i);
      scale = jaxserve::kvq::quantize_row<Codec>(x, D, vr);
      std::memcpy(vr + D, &scale, sizeof scale);
    }
  }
}

// Checks the batch, then runs every (sequence, query tile, kv head) work item.
template <typename T, typename Pages>
ffi::Error attend_all(ffi::ThreadPool& pool, const Dims& d, const Params& p, const T* q,
                      const Pages& pages, const int32_t* block_tables, const int32_t* seq_lens,
                      const int32_t* qsl, T* out) {
  std::memset(out, 0, d.tokens * d.q_heads * d.head_dim * sizeof(T));  // padding tokens: zeros
  std::vector<WorkItem> items;
  for (int32_t s = 0; s < d.seqs; ++s) {
    const int64_t qlen = qsl[s + 1] - qsl[s];
    if (seq_lens[s] <= 0 || qlen <= 0) continue;
    if (qlen > seq_lens[s] || qsl[s + 1] > d.tokens)
      return ffi::Error::InvalidArgument("paged attention: a chunk is longer than its sequence");
    const int64_t blocks = (seq_lens[s] + d.block_size - 1) / d.block_size;
    if (blocks > d.width)
      return ffi::Error::InvalidArgument("paged attention: seq_len exceeds the block table");
    for (int64_t b = 0; b < blocks; ++b) {
      const int32_t id = block_tables[s * d.width + b];
      if (id < 0 || id >= d.num_blocks)
        return ffi::Error::InvalidArgument("paged attention: block id out of range");
    }
    for (int32_t f = 0; f < qlen; f += kTile)
      for (int32_t h = 0; h < d.kv_heads; ++h)
        items.push_back({s, f, static_cast<int32_t>(std::min<int64_t>(kTile, qlen - f)), h});
  }
  jaxserve::ParallelFor(pool, static_cast<int64_t>(items.size()), [&](int64_t i) {
    thread_local Scratch<typename Pages::Q> sc;
    if (items[i].count == 1)
      attend_token(d, p, items[i], q, pages, block_tables, seq_lens, qsl, out, sc);
    else
      attend(d, p, items[i], q, pages, block_tables, seq_lens, qsl, out, sc);
  });
  return ffi::Error::Success();
}

struct Batch {  // the int32 arguments
  const int32_t *slots, *block_tables, *seq_lens, *qsl;
};

// Float pages: q, new K/V, out and pages all T.
template <typename T>
ffi::Error run(ffi::ThreadPool& pool, const Dims& d, const Params& p, const Batch& b,
               ffi::AnyBuffer q, ffi::AnyBuffer k_new, ffi::AnyBuffer v_new, ffi::AnyBuffer out,
               ffi::AnyBuffer k_pages, ffi::AnyBuffer v_pages) {
  T* kp = static_cast<T*>(k_pages.untyped_data());
  T* vp = static_cast<T*>(v_pages.untyped_data());
  write_kv(d, static_cast<const T*>(k_new.untyped_data()),
           static_cast<const T*>(v_new.untyped_data()), b.slots, kp, vp);
  const FloatPages<T> pages{kp, vp, d.head_dim, d.block_size};
  return attend_all(pool, d, p, static_cast<const T*>(q.untyped_data()), pages, b.block_tables,
                    b.seq_lens, b.qsl, static_cast<T*>(out.untyped_data()));
}

// Quantized pages (bytes of Codec): q, new K/V and out T.
template <typename Codec, typename T>
ffi::Error run_quant(ffi::ThreadPool& pool, const Dims& d, const Params& p, const Batch& b,
                     ffi::AnyBuffer q, ffi::AnyBuffer k_new, ffi::AnyBuffer v_new,
                     ffi::AnyBuffer out, ffi::AnyBuffer k_pages, ffi::AnyBuffer v_pages) {
  uint8_t* kp = static_cast<uint8_t*>(k_pages.untyped_data());
  uint8_t* vp = static_cast<uint8_t*>(v_pages.untyped_data());
  write_kv_quant<Codec>(d, static_cast<const T*>(k_new.untyped_data()),
                        static_cast<const T*>(v_new.untyped_data()), b.slots, kp, vp);
  const QuantPages<Codec, T> pages{kp, vp, d.head_dim, d.block_size};
  return attend_all(pool, d, p, static_cast<const T*>(q.untyped_data()), pages, b.block_tables,
                    b.seq_lens, b.qsl, static_cast<T*>(out.untyped_data()));
}

// Pages by their dtype: int8 or e4m3 bytes, else float (q's dtype T, checked by the caller).
template <typename T>
ffi::Error run_pages(ffi::DataType page_dt, ffi::ThreadPool& pool, const Dims& d,
                     const Params& p, const Batch& b, ffi::AnyBuffer q, ffi::AnyBuffer k_new,
                     ffi::AnyBuffer v_new, ffi::AnyBuffer out, ffi::AnyBuffer k_pages,
                     ffi::AnyBuffer v_pages) {
  using jaxserve::kvq::E4M3Codec, jaxserve::kvq::Int8Codec;
  if (page_dt == ffi::DataType::S8)
    return run_quant<Int8Codec, T>(pool, d, p, b, q, k_new, v_new, out, k_pages, v_pages);
  if (page_dt == ffi::DataType::U8)
    return run_quant<E4M3Codec, T>(pool, d, p, b, q, k_new, v_new, out, k_pages, v_pages);
  return run<T>(pool, d, p, b, q, k_new, v_new, out, k_pages, v_pages);
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_new, ffi::AnyBuffer v_new,
                          ffi::AnyBuffer, ffi::AnyBuffer, ffi::Buffer<ffi::S32> slots,
                          ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> seq_lens,
                          ffi::Buffer<ffi::S32> qsl, ffi::Result<ffi::AnyBuffer> out,
                          ffi::Result<ffi::AnyBuffer> k_pages, ffi::Result<ffi::AnyBuffer> v_pages,
                          float scale, int32_t window, float soft_cap) {
  auto qd = q.dimensions(), pd = k_pages->dimensions(), bd = block_tables.dimensions();
  if (qd.size() != 3 || pd.size() != 4 || bd.size() != 2)
    return ffi::Error::InvalidArgument("paged attention: q must be rank 3, pages rank 4");
  const Dims d{qd[0], qd[1], pd[0], qd[2], pd[1], pd[2], bd[0], bd[1]};
  if (d.block_size > kMaxBlock)
    return ffi::Error::InvalidArgument("paged attention: block_size above 256");
  if (d.head_dim % 2 != 0 || d.head_dim > kMaxHeadDim)
    return ffi::Error::InvalidArgument("paged attention: head_dim must be even and <= 1024");
  const auto dt = q.element_type(), page_dt = k_pages->element_type();
  if (k_new.element_type() != dt || v_new.element_type() != dt ||
      v_pages->element_type() != page_dt)
    return ffi::Error::InvalidArgument("paged attention: new K/V differ from q, or K from V "
                                       "pages, in dtype");
  const bool quantized = page_dt == ffi::DataType::S8 || page_dt == ffi::DataType::U8;
  const int64_t row = d.head_dim + (quantized ? jaxserve::kvq::kScaleBytes : 0);
  if (d.q_heads % d.kv_heads != 0 || pd[3] != row)
    return ffi::Error::InvalidArgument("paged attention: head counts or page rows disagree");
  const Params p{scale, window, soft_cap};
  const Batch b{slots.typed_data(), block_tables.typed_data(), seq_lens.typed_data(),
                qsl.typed_data()};
  if (!quantized && page_dt != dt)
    return ffi::Error::InvalidArgument("paged attention: float pages must have q's dtype");
  if (dt == ffi::DataType::F32)
    return run_pages<float>(page_dt, pool, d, p, b, q, k_new, v_new, *out, *k_pages, *v_pages);
  if (dt == ffi::DataType::BF16)
    return run_pages<uint16_t>(page_dt, pool, d, p, b, q, k_new, v_new, *out, *k_pages, *v_pages);
  return ffi::Error::InvalidArgument("paged attention: q must be bfloat16 or float32");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveCpuPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k_new
                                  .Arg<ffi::AnyBuffer>()  // v_new
                                  .Arg<ffi::AnyBuffer>()  // k_pages (aliased to result 1)
                                  .Arg<ffi::AnyBuffer>()  // v_pages (aliased to result 2)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slot_mapping
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // seq_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // query_start_loc
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // k_pages
                                  .Ret<ffi::AnyBuffer>()  // v_pages
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("sliding_window")
                                  .Attr<float>("soft_cap"));
