// Float32 products on AMX tiles: y [m, n] = x [m, k] @ W^T (W [n, k]) to float32 accuracy, for the float32 path's
// linear layers on CPUs with AMX-BF16 (cpu_kernels.cc; elsewhere they stay on the BLAS).
//
// Every float32 value splits exactly into three bfloat16 parts (bf16x3_split.h: x = hi + mid + lo, each part
// product exact in float32); of the nine part products the six that matter are summed, the three left out adding
// up to less than 2^-21 |x w| (float32 rounds one product to 2^-24). Against float64 the error measures 1-2 units
// of float32 roundoff of sum |x w|, the BLAS's 0.8-4 (tests/kernels/test_gemm_bf16x3.py).
//
// One TDPBF16PS does 16 x 16 x 32 multiply-adds in about 15 cycles when its operands are in L1 or L2 (17 in this
// loop's pattern of loads, 29 with tile rows straddling cache lines); whole products incl. the split measured
// 1.3-1.7x the BLAS's float32 sgemm at 512-4096 rows (benchmarks/encode.py measures the whole model).
//
// Layouts (bf16 as uint16_t, one tile = 16 rows x 32 = 512 values, kb = k / 32 rounded up, the padding zero):
//   packed W [nb][kb][3 parts][16 k-pairs][16 columns][2]: nb = n / 16 rounded up to a multiple of 4;
//   packed x, one chunk of 128 rows x up to 1024 k at a time: [row groups of 16][k-tiles][3 parts][16 rows][32].
// Blocking: 16 rows x 64 columns of y (4 accumulator tiles) per step; the three parts of x's tile stay in
// tiles 0-2 while each of W's tiles passes through tile 3. Rows in chunks of 128 and k in chunks of 1024: each
// chunk of x is split and packed (768 KiB) and stays in L2 while W's 64-column panels (384 KiB per k chunk)
// stream past it (chunks of 64-512 rows and 256-2048 k measured within noise of this; 1.3-1.7x the BLAS).
// Every buffer the tiles read is 64-byte aligned (a tile row straddling two cache lines halved the loop's rate).
#ifndef BGEM3_GEMM_BF16X3_H_
#define BGEM3_GEMM_BF16X3_H_

#include "bf16x3_split.h"
#include "gemm_f32.h"
#include "packed_weights.h"

#include <atomic>
#include <initializer_list>

namespace {

#if BGEM3_AMX_BF16
const int64_t kPanelRows = 128, kPanelK = 32;   // kPanelK in k-tiles of 32

struct Bf16x3Weight {
  int64_t n = 0, k = 0, kb = 0, nb = 0;
  AlignedArray<uint16_t> t;   // 64-byte aligned: a tile row must not straddle two cache lines
  uint16_t *tiles = nullptr;  // t, or tiles packed ahead (packed_weights.h) that this object does not own

  // uint16s of the tiles of W [n, k].
  static int64_t size(int64_t rows, int64_t cols) { return (rows + 63) / 64 * 4 * ((cols + 31) / 32) * 3 * kPartTile; }
  // Size for W [n, k]; call from one thread, before pack().
  void allocate(int64_t rows, int64_t cols) {
    n = rows, k = cols, kb = (k + 31) / 32, nb = (n + 63) / 64 * 4;
    t = aligned_array<uint16_t>(nb * kb * 3 * kPartTile);
    tiles = t.get();
  }
  // The same over size(rows, cols) uint16s at `at` (64-byte aligned), kept by the caller.
  void attach(int64_t rows, int64_t cols, uint16_t *at) {
    n = rows, k = cols, kb = (k + 31) / 32, nb = (n + 63) / 64 * 4;
    tiles = at;
  }

  // Split and pack W stored [n, k] (row stride ldw; y = x @ W^T); every thread of a parallel region calls it and
  // shares the tiles. No barrier at the end: the caller adds one before any product reads the tiles.
  void pack(const float *w, int64_t ldw) {
#pragma omp for schedule(dynamic, 4) nowait
    for (int64_t i = 0; i < nb * kb; ++i) {
      const int64_t c0 = (i / kb) * 16, k0 = (i % kb) * 32;
      pack_tile_nk(w + std::min(c0, n - 1) * ldw + k0, ldw, std::min<int64_t>(16, n - c0),
                   std::min<int64_t>(32, k - k0), tiles + i * 3 * kPartTile);
    }
  }

  // The same for W stored [k, n] (row stride ldw; y = x @ W).
  void pack_kn(const float *w, int64_t ldw) {
#pragma omp for schedule(dynamic, 4) nowait
    for (int64_t i = 0; i < nb * kb; ++i) {
      const int64_t c0 = (i / kb) * 16, k0 = (i % kb) * 32;
      pack_tile_kn(w + k0 * ldw + std::min(c0, n - 1), ldw, std::min<int64_t>(32, k - k0),
                   std::min<int64_t>(16, n - c0), tiles + i * 3 * kPartTile);
    }
  }
};

// uint16 scratch per worker for gemm_bf16x3 with k columns.
inline int64_t bf16x3_scratch(int64_t k) { return kPanelRows / 16 * std::min(kPanelK, (k + 31) / 32) * 3 * kPartTile; }

// Accumulator tiles 4-7 <- 16 rows x 64 columns of y (zero when `first`), or back; partial blocks go through s.
inline void load_block(bool first, const float *y, int64_t ldy, int64_t rows, int64_t cols, float *s) {
  if (first) {
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    return;
  }
  const float *src = y;
  int64_t ld = ldy;
  if (rows < 16 || cols < 64) {
    for (int64_t r = 0; r < 16; ++r)
      for (int64_t c = 0; c < 64; ++c) s[r * 64 + c] = r < rows && c < cols ? y[r * ldy + c] : 0.0f;
    src = s, ld = 64;
  }
  _tile_loadd(4, src, 4 * ld);
  _tile_loadd(5, src + 16, 4 * ld);
  _tile_loadd(6, src + 32, 4 * ld);
  _tile_loadd(7, src + 48, 4 * ld);
}

inline void store_block(float *y, int64_t ldy, int64_t rows, int64_t cols, float *s) {
  const bool full = rows == 16 && cols == 64;
  float *dst = full ? y : s;
  const int64_t ld = full ? ldy : 64;
  _tile_stored(4, dst, 4 * ld);
  _tile_stored(5, dst + 16, 4 * ld);
  _tile_stored(6, dst + 32, 4 * ld);
  _tile_stored(7, dst + 48, 4 * ld);
  if (!full)
    for (int64_t r = 0; r < rows; ++r) std::memcpy(y + r * ldy, s + r * 64, cols * sizeof(float));
}

// One part of W against the parts of x it meets (hi: all three, mid: hi and mid, lo: hi), for the four
// accumulators in turn, so that consecutive products go to different tiles.
#define BGEM3_BF16X3_DP(C, parts)                \
  _tile_dpbf16ps(C, 0, 3);                       \
  if ((parts) > 1) _tile_dpbf16ps(C, 1, 3);      \
  if ((parts) > 2) _tile_dpbf16ps(C, 2, 3);
#define BGEM3_BF16X3_PART(wt, step, p)                                              \
  _tile_loadd(3, (wt) + (p) * kPartTile, 64);                                           \
  BGEM3_BF16X3_DP(4, 3 - (p))                                                       \
  _tile_loadd(3, (wt) + (step) + (p) * kPartTile, 64);                                  \
  BGEM3_BF16X3_DP(5, 3 - (p))                                                       \
  _tile_loadd(3, (wt) + 2 * (step) + (p) * kPartTile, 64);                              \
  BGEM3_BF16X3_DP(6, 3 - (p))                                                       \
  _tile_loadd(3, (wt) + 3 * (step) + (p) * kPartTile, 64);                              \
  BGEM3_BF16X3_DP(7, 3 - (p))

// y [m, n] (row stride ldy) = (or +=, accumulate) x [m, k] (row stride ldx) @ W^T, W packed; a: bf16x3_scratch(k)
// uint16s, 64-byte aligned. One worker's share: call from inside a parallel region after W is packed, or from one
// thread.
void gemm_bf16x3(const float *x, int64_t ldx, int64_t m, const Bf16x3Weight &w, float *y, int64_t ldy,
                 uint16_t *a, bool accumulate = false) {
  tile_configure();
  alignas(64) float s[16 * 64];
  const int64_t kb = w.kb;
  for (int64_t r0 = 0; r0 < m; r0 += kPanelRows) {
    const int64_t mr = std::min(kPanelRows, m - r0), groups = (mr + 15) / 16;
    for (int64_t b0 = 0; b0 < kb; b0 += kPanelK) {
      const int64_t b1 = std::min(kb, b0 + kPanelK), chunk = b1 - b0;
      pack_rows(x + r0 * ldx + 32 * b0, ldx, mr, std::min(w.k - 32 * b0, 32 * chunk), a);
      for (int64_t c0 = 0; c0 < w.n; c0 += 64) {
        const int64_t cols = std::min<int64_t>(64, w.n - c0);
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t rows = std::min<int64_t>(16, mr - 16 * g);
          float *out = y + (r0 + 16 * g) * ldy + c0;
          load_block(b0 == 0 && !accumulate, out, ldy, rows, cols, s);
          for (int64_t b = b0; b < b1; ++b) {
            const uint16_t *at = a + (g * chunk + b - b0) * 3 * kPartTile;
            _tile_loadd(0, at, 64);
            _tile_loadd(1, at + kPartTile, 64);
            _tile_loadd(2, at + 2 * kPartTile, 64);
            const uint16_t *wt = w.tiles + ((c0 / 16) * kb + b) * 3 * kPartTile;
            const int64_t step = kb * 3 * kPartTile;    // to the next 16 columns
            BGEM3_BF16X3_PART(wt, step, 0)
            BGEM3_BF16X3_PART(wt, step, 1)
            BGEM3_BF16X3_PART(wt, step, 2)
          }
          store_block(out, ldy, rows, cols, s);
        }
      }
    }
  }
  _tile_release();
}
#undef BGEM3_BF16X3_PART
#undef BGEM3_BF16X3_DP
#else
struct Bf16x3Weight {   // without AMX-BF16 nothing is packed and the BLAS computes every product
  static int64_t size(int64_t, int64_t) { return 0; }
  void allocate(int64_t, int64_t) {}
  void attach(int64_t, int64_t, uint16_t *) {}
  void pack(const float *, int64_t) {}
  void pack_kn(const float *, int64_t) {}
};
inline int64_t bf16x3_scratch(int64_t) { return 0; }
inline void gemm_bf16x3(const float *, int64_t, int64_t, const Bf16x3Weight &, float *, int64_t, uint16_t *,
                        bool = false) {}
#endif  // BGEM3_AMX_BF16

// Switched on (the default; BGEM3_BF16X3=0 in the environment: off) or off (the BLAS) by m3_bf16x3 / m3t_bf16x3
// (tests and benchmarks). Below 64 rows per call the BLAS computes: the weights are split and packed once per call
// (memory-bound, about 0.6 ns per weight on 2 threads), which costs about what the tiles save at 16-32 rows
// (1024 x 4096 weights: 0.92x the BLAS at 16 and 32 rows, 1.02-1.05x at 64, 1.13x at 512, 1.3-1.6x from 4096).
PathSwitch bf16x3_path{"BGEM3_BF16X3", 64};

inline bool bf16x3_on(int64_t rows) { return BGEM3_AMX_BF16 && amx_granted() && bf16x3_path.wants(rows); }

// The switch behind m3_bf16x3 / m3t_bf16x3 (PathSwitch::set); 1 if calls at the threshold now run on AMX.
inline int bf16x3_switch(int on, int64_t min_rows) { return bf16x3_path.set(on, min_rows, bf16x3_on); }

// The float32 products y = x @ W_j^T of one kernel call, for its weights W_j [n_j, k_j]: on AMX, where
// bf16x3_on(rows), else on AVX-512 registers, where f32gemm_on(rows) (gemm_f32.h), with each W_j packed once per
// call and shared by the workers, or packed ahead (packed_weights.h: `prepacked` / `prepacked_bf16`, a W_j's
// packings found by weight_ahead, which f32gemm_on also takes in its packed-only state); else the BLAS.
class Products {
 public:
  struct Weight {   // y = x @ W^T for W stored [n, k] (nk, the default), y = x @ W for W stored [k, n]
    const float *w;
    int64_t n, k;
    bool nk = true;
    const float *prepacked = nullptr;   // nk only: its packing in F32Weight's layout at f32_block_k(k)
    const uint16_t *prepacked_bf16 = nullptr;   // nk only: its tiles in Bf16x3Weight's layout
  };
  Products(int64_t rows, std::initializer_list<Weight> weights) : w_(weights), amx_(bf16x3_on(rows)) {
    bool ahead = false;
    for (const Weight &w : w_) {
      kmax_ = std::max(kmax_, w.k);
      ahead = ahead || (w.prepacked && w.nk);
    }
    f32_ = !amx_ && f32gemm_on(rows, ahead);
    if (amx_) {
      packed_.resize(w_.size());
      for (size_t j = 0; j < w_.size(); ++j) {
        if (ahead_bf16_(w_[j]))
          packed_[j].attach(w_[j].n, w_[j].k, const_cast<uint16_t *>(w_[j].prepacked_bf16));
        else
          packed_[j].allocate(w_[j].n, w_[j].k);
      }
    } else if (f32_) {
      panels_.resize(w_.size());
      int64_t total = 0;
      for (const Weight &w : w_) total += ahead_(w) ? 0 : f32_packed_size(w.n, w.k);
      float *buffer = f32_arena(total);
      for (size_t j = 0; j < w_.size(); ++j) {
        if (ahead_(w_[j])) {
          panels_[j].allocate(w_[j].n, w_[j].k, const_cast<float *>(w_[j].prepacked));
        } else {
          panels_[j].allocate(w_[j].n, w_[j].k, buffer);
          buffer += f32_packed_size(w_[j].n, w_[j].k);
        }
      }
    }
  }
  // Every thread of the parallel region calls it (the packing is shared; it ends with a barrier). only >= 0:
  // pack just that weight (one whose values are written inside the region, once they are).
  void pack(int only = -1) {
    if (!amx_ && !f32_) return;
    for (size_t j = 0; j < w_.size(); ++j) {
      if ((only >= 0 && (size_t)only != j) || (f32_ && ahead_(w_[j])) || (amx_ && ahead_bf16_(w_[j]))) continue;
      const int64_t ld = w_[j].nk ? w_[j].k : w_[j].n;
      if (amx_ && w_[j].nk) packed_[j].pack(w_[j].w, ld);
      if (amx_ && !w_[j].nk) packed_[j].pack_kn(w_[j].w, ld);
      if (f32_ && w_[j].nk) panels_[j].pack(w_[j].w, ld);
      if (f32_ && !w_[j].nk) panels_[j].pack_kn(w_[j].w, ld);
    }
#pragma omp barrier
  }
  // A worker's scratch for run() (uint16s; the AVX-512 path reads it as floats).
  AlignedArray<uint16_t> scratch() const {
    if (amx_) return aligned_array<uint16_t>(bf16x3_scratch(kmax_));
    return f32_ ? aligned_array<uint16_t>(2 * f32_scratch(kmax_)) : nullptr;
  }
  // What every thread of the region does first: pack (all weights, or just `only`), then take its scratch.
  AlignedArray<uint16_t> start(int only = -1) {
    pack(only);
    return scratch();
  }
  // y [m, n_j] (row stride ldy) = (or +=, accumulate) x [m, k_j] (row stride ldx) @ op(W_j).
  void run(size_t j, const float *x, int64_t ldx, int64_t m, float *y, int64_t ldy, uint16_t *scratch,
           bool accumulate = false) const {
    if (amx_) return gemm_bf16x3(x, ldx, m, packed_[j], y, ldy, scratch, accumulate);
    if (f32_) return gemm_f32(x, ldx, m, panels_[j], y, ldy, reinterpret_cast<float *>(scratch), accumulate);
    const Weight &w = w_[j];
    gemm(w.nk, m, w.n, w.k, 1.0f, x, ldx, w.w, w.nk ? w.k : w.n, accumulate ? 1.0f : 0.0f, y, ldy);
  }

 private:
  std::vector<Weight> w_;
  bool amx_, f32_;
  int64_t kmax_ = 0;
  std::vector<Bf16x3Weight> packed_;
  std::vector<F32Weight> panels_;
  static bool ahead_(const Weight &w) { return w.prepacked && w.nk; }
  static bool ahead_bf16_(const Weight &w) { return w.prepacked_bf16 && w.nk; }
};

// Products' weight W [n, k] (stored [n, k]) with whatever of it `set` holds packed ahead that still describes it.
inline Products::Weight weight_ahead(const PackedSet *set, const float *w, int64_t n, int64_t k) {
  const PackedWeight *p = packed_entry(set, w, n, k);
  return {w, n, k, true, p && p->kblock == f32_block_k(k) ? p->data.get() : nullptr, p ? p->bf16.get() : nullptr};
}

// Pack `count` weights W_j [n_j, k_j] (y = x @ W_j^T) ahead, for what their products run on: bfloat16 triples where
// AMX takes calls (bf16x3_on at any row count past its threshold), else gemm_f32's panels (pack_weights); register
// them and return the set's id (0: nothing to pack for here). Bit for bit what Products packs per call.
inline int64_t pack_weights_ahead(const float *const *w, const int64_t *n, const int64_t *k, int count) {
#if BGEM3_AMX_BF16
  if (bf16x3_on(int64_t(1) << 40)) {
    auto set = std::make_shared<PackedSet>(count);
    std::vector<Bf16x3Weight> tiles(count);
    for (int j = 0; j < count; ++j) {
      PackedWeight &p = (*set)[j];
      p.w = w[j], p.n = n[j], p.k = k[j], p.kblock = -1;   // no gemm_f32 panels: weight_ahead reads only its tiles
      p.bf16 = aligned_array<uint16_t>(Bf16x3Weight::size(n[j], k[j]));
      tiles[j].attach(n[j], k[j], p.bf16.get());
      p.sample = weight_sample(w[j], n[j], k[j]);
    }
#pragma omp parallel
    for (int j = 0; j < count; ++j) tiles[j].pack(w[j], k[j]);   // distinct buffers: no barrier between weights
    return register_packed(set);
  }
#endif
  return pack_weights(w, n, k, count);
}

}  // namespace

#endif  // BGEM3_GEMM_BF16X3_H_
