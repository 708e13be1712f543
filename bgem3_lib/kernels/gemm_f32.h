// Float32 products on AVX-512 registers: y [m, n] = x [m, k] @ W^T (W [n, k]), for the float32 path's linear
// layers on CPUs with AVX-512 and without AMX (with AMX: gemm_bf16x3.h). The same FMA summation as a BLAS sgemm,
// but independent of which kernel the BLAS picked at load time: NumPy's OpenBLAS runs its AVX2 (Haswell) kernel
// where OPENBLAS_CORETYPE=Haswell pins it (older OpenBLAS builds misdetect some new CPUs), at about half an
// AVX-512 core's rate; and OpenBLAS's per-worker sgemm calls each pack the whole weight again.
//
// Layouts: W packed once per call and shared by the workers, in panels of 32 columns, k-major:
//   packed W [k / kb rounded up][n / 32 rounded up][kb (fewer in the last block)][32], kb = f32_block_k(k) (columns
//   past n zero; F32Weight::at);
//   packed x, one chunk of kF32ChunkRows rows x kb k at a time: [row groups of kF32Rows][k][kF32Rows].
// Register blocking: 12 rows x 32 columns of y in 24 zmm accumulators; per k, two loads of W's panel and twelve
// broadcasts of x, for 24 FMAs. Cache blocking: with k blocks of kF32BlockK a panel's 256 x 32 slice (32 KiB) stays
// in L1 while the chunk's row groups (kF32ChunkRows x 256, 144 KiB, in L2) pass it; with all of k <= f32_whole_k()
// in one block both come from L2 and each block of y is written once.
//
// Worked example: m = 30 rows, n = 40, k = 300 -> 2 panels (32 + 8 columns, the second masked), one k block of 300
// (k blocks 256 + 44 with f32_whole_k() below 300), 3 row groups (12 + 12 + 6 rows, the last one's stores masked to
// 6 rows).
#ifndef BGEM3_GEMM_F32_H_
#define BGEM3_GEMM_F32_H_

#include <atomic>

namespace {

// One product path's switch (this file's AVX-512 kernel, gemm_bf16x3.h's AMX one): wanted (on unless the
// environment variable `env` is 0) and the fewest token rows per call it takes (fewer: the BLAS). Tests and
// benchmarks move both through the m3_* / m3t_* functions. wanted = kPackedOnly: only for weights packed ahead of
// the call (packed_weights.h), which skip the per-call packing that makes the path no faster than some BLASes.
const int kPackedOnly = 2;
struct PathSwitch {
  std::atomic<int> wanted;
  std::atomic<int64_t> min_rows;
  PathSwitch(const char *env, int64_t rows) : wanted(off_in_environment(env) ? 0 : 1), min_rows(rows) {}
  static bool off_in_environment(const char *env) {
    const char *e = std::getenv(env);
    return e && e[0] == '0';
  }
  bool wants(int64_t rows, bool prepacked = false) const {
    const int on = wanted.load(std::memory_order_relaxed);
    return (on == 1 || (on == kPackedOnly && prepacked)) && rows >= min_rows.load(std::memory_order_relaxed);
  }
  // on (1), off (0), kPackedOnly (2) or unchanged (-1), the row threshold set when rows >= 1; returns 1 if a call at
  // the threshold (weights not packed ahead) now runs on the path (runs(rows): the path's whole test, with what the
  // CPU and build allow).
  int set(int on, int64_t rows, bool (*runs)(int64_t)) {
    if (on >= 0) wanted.store(on <= kPackedOnly ? on : 1);
    if (rows >= 1) min_rows.store(rows);
    return runs(min_rows.load()) ? 1 : 0;
  }
};

const int64_t kF32BlockK = 256;   // k per block past f32_whole_k()
// Up to this k a product takes all of k in one block, so each 12 x 32 block of y is written once, not read and
// written again per 256 k: the full-size q/k/v/o and FFN-in products (k = 1024) measured 1.06-1.15x the
// 256-blocked kernel at 1024-2048 rows (AMD EPYC Zen 5; a row group's 1024 x 12 floats and a panel's 1024 x 32
// then come from L2, which keeps up). Past it (FFN-out, k = 4096) the 256 blocks stay: 1024-blocks measured
// 0.94-1.05x there. Settable (m3_f32gemm_whole_k) so that tests reach both layouts at small k.
std::atomic<int64_t> f32_whole_k_v{1024};
inline int64_t f32_whole_k() { return f32_whole_k_v.load(std::memory_order_relaxed); }
// The k block of W [n, k]: all of k up to f32_whole_k(), else kF32BlockK (a multiple of 16, as pack() needs).
inline int64_t f32_block_k(int64_t k) { return k <= f32_whole_k() ? k : kF32BlockK; }

// How many gemm_f32 calls (a worker's share of one product each) this library has run: tests tell by it which path
// took a product, where the BLAS's kernel may sum in the very order this one does (OpenBLAS's AVX-512 sgemm does
// at small k) and give the same bits.
std::atomic<int64_t> f32gemm_calls{0};

#if defined(__AVX512F__)
const int kF32Rows = 12;                  // register block: 12 rows x 32 columns
const int64_t kF32Cols = 32, kF32ChunkRows = 144, kF32BlockPanels = 32;
static_assert(kF32BlockK % 16 == 0, "the packing transposes 16 k at a time within one k block");

// r[j] lane q <- r[q] lane j: a 16 x 16 float transpose in registers (32-, 64- then 128-bit interleaves).
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int j = 0; j < 16; j += 2) {
    t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);       // r[j][0] r[j+1][0] r[j][1] r[j+1][1] per 128-bit lane
    t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
  }
  for (int j = 0; j < 16; j += 4) {
    for (int h = 0; h < 2; ++h) {
      u[j + h] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[j + h]), _mm512_castps_pd(t[j + 2 + h])));
      u[j + 2 + h] =
          _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[j + h]), _mm512_castps_pd(t[j + 2 + h])));
    }
  }
  for (int g = 0; g < 16; g += 8)
    for (int c = 0; c < 4; ++c) {
      t[g + c] = _mm512_shuffle_f32x4(u[g + c], u[g + 4 + c], 0x88);       // lanes 0, 2 of each
      t[g + 4 + c] = _mm512_shuffle_f32x4(u[g + c], u[g + 4 + c], 0xdd);   // lanes 1, 3 of each
    }
  for (int c = 0; c < 8; ++c) {
    u[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    u[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd);
  }
  // After the four interleaves u[i] holds column order[i] (found by tests/kernels/test_gemm_f32.py's check).
  static const int order[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
  for (int i = 0; i < 16; ++i) r[order[i]] = u[i];
}

// Floats of packed W [n, k].
inline int64_t f32_packed_size(int64_t n, int64_t k) { return (n + kF32Cols - 1) / kF32Cols * kF32Cols * k; }

// A buffer of at least `floats` floats, kept by the calling thread and reused by its later calls: a fresh
// allocation of this size is mmap'ed, and its first-touch page faults cost about as much as the packing itself.
// Slot 0 holds the products' shared packed weights (gemm_bf16x3.h's Products); a worker's own A^T B products
// (gemm_f32_tn) use slots 1 and 2, so that they never overwrite panels another worker still reads.
template <int Slot = 0>
inline float *f32_arena(int64_t floats) {
  thread_local AlignedArray<float> arena;
  thread_local int64_t capacity = 0;
  if (floats > capacity) {
    arena = aligned_array<float>(floats);
    capacity = floats;
  }
  return arena.get();
}

struct F32Weight {
  int64_t n = 0, k = 0, panels = 0, kblock = kF32BlockK;
  float *t = nullptr;   // f32_packed_size(n, k) floats, 64-byte aligned, owned by the caller

  // Row q (of k) of panel p: the panels of one kblock block of k lie one after another, [k blocks][panels]
  // [rows of the block][32], so the product's pass over the panels of a block reads memory in order.
  float *at(int64_t p, int64_t q) const {
    const int64_t k0 = q / kblock * kblock, kc = std::min(kblock, k - k0);
    return t + k0 * panels * kF32Cols + (p * kc + q - k0) * kF32Cols;
  }

  // Size for W [n, k] into `buffer`; call from one thread, before pack().
  void allocate(int64_t rows, int64_t cols, float *buffer) {
    n = rows, k = cols, panels = (n + kF32Cols - 1) / kF32Cols, kblock = f32_block_k(cols);
    t = buffer;
  }

  // Pack W stored [n, k] (row stride ldw; y = x @ W^T); every thread of a parallel region calls it and shares
  // the panels. No barrier at the end: the caller adds one before any product reads them.
  void pack(const float *w, int64_t ldw) {
    const int64_t kb = (k + 15) / 16;
#pragma omp for schedule(dynamic, 8) nowait
    for (int64_t i = 0; i < panels * kb * 2; ++i) {   // 16 columns x 16 k per step, transposed in registers
      const int64_t p = i / (2 * kb), k0 = (i / 2 % kb) * 16, c0 = p * kF32Cols + (i % 2) * 16;
      const int64_t cols = std::max<int64_t>(0, std::min<int64_t>(16, n - c0)), depth = std::min<int64_t>(16, k - k0);
      __m512 r[16];
      const __mmask16 lanes = lanes_below(depth);
      for (int j = 0; j < 16; ++j)
        r[j] = j < cols ? _mm512_maskz_loadu_ps(lanes, w + (c0 + j) * ldw + k0) : _mm512_setzero_ps();
      transpose16(r);
      float *out = at(p, k0) + (i % 2) * 16;   // 16 rows in one k block: kF32BlockK % 16 == 0
      for (int q = 0; q < depth; ++q) _mm512_store_ps(out + q * kF32Cols, r[q]);
    }
  }

  // The same for W stored [k, n] (row stride ldw; y = x @ W).
  void pack_kn(const float *w, int64_t ldw) {
#pragma omp for schedule(dynamic, 8) nowait
    for (int64_t p = 0; p < panels; ++p) pack_kn_panel(p, w, ldw);
  }

  // pack_kn by the calling thread alone (a worker's own product, outside any work sharing).
  void pack_kn_serial(const float *w, int64_t ldw) {
    for (int64_t p = 0; p < panels; ++p) pack_kn_panel(p, w, ldw);
  }

  void pack_kn_panel(int64_t p, const float *w, int64_t ldw) {
    const int64_t c0 = p * kF32Cols, cols = std::min(kF32Cols, n - c0);
    for (int64_t q = 0; q < k; ++q) {
      float *out = at(p, q);
      std::memcpy(out, w + q * ldw + c0, cols * sizeof(float));
      for (int64_t j = cols; j < kF32Cols; ++j) out[j] = 0.0f;
    }
  }
};

// Float scratch per worker for gemm_f32 with at most k columns (enough for any k block of a weight with k or fewer).
inline int64_t f32_scratch(int64_t k) { return kF32ChunkRows * std::min(k, std::max(kF32BlockK, f32_whole_k())); }

// y [rows <= 12, 32 columns masked by m0 | m1] (row stride ldy) = (or +=, load) a [kc][12] @ b [kc][32]; with
// `next`, the kc x 32 slice there is prefetched into L1 along the way (the caller's next panel: 0.97-0.99x
// OpenBLAS's Cooperlake kernel on a full-size encode with it, 0.91-0.94x without, same minutes).
inline void f32_block(const float *a, const float *b, int64_t kc, float *y, int64_t ldy, int64_t rows,
                      __mmask16 m0, __mmask16 m1, bool load, const float *next = nullptr) {
  __m512 c0[kF32Rows], c1[kF32Rows];
#pragma GCC unroll 12
  for (int r = 0; r < kF32Rows; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t q = 0; q < kc; ++q) {
    const __m512 b0 = _mm512_load_ps(b + q * kF32Cols), b1 = _mm512_load_ps(b + q * kF32Cols + 16);
    const float *aq = a + q * kF32Rows;
    if (next) {
      _mm_prefetch((const char *)(next + q * kF32Cols), _MM_HINT_T0);
      _mm_prefetch((const char *)(next + q * kF32Cols + 16), _MM_HINT_T0);
    }
#pragma GCC unroll 12
    for (int r = 0; r < kF32Rows; ++r) {
      const __m512 ar = _mm512_set1_ps(aq[r]);
      c0[r] = _mm512_fmadd_ps(ar, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(ar, b1, c1[r]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < kF32Rows; ++r) {
    if (r < rows && load) {
      c0[r] = _mm512_add_ps(c0[r], _mm512_maskz_loadu_ps(m0, y + r * ldy));
      c1[r] = _mm512_add_ps(c1[r], _mm512_maskz_loadu_ps(m1, y + r * ldy + 16));
    }
    if (r < rows) {
      _mm512_mask_storeu_ps(y + r * ldy, m0, c0[r]);
      _mm512_mask_storeu_ps(y + r * ldy + 16, m1, c1[r]);
    }
  }
}

// a [groups][kc][12] <- x [rows, kc] (row stride ldx), rows past `rows` zero; 16 k of 12 rows at a time, transposed
// in registers (4 rows of the 16 zero and not stored).
inline void pack_row_groups(const float *x, int64_t ldx, int64_t rows, int64_t kc, float *a) {
  const int64_t groups = (rows + kF32Rows - 1) / kF32Rows;
  for (int64_t g = 0; g < groups; ++g) {
    float *ag = a + g * kc * kF32Rows;
    const int64_t live = std::min<int64_t>(kF32Rows, rows - g * kF32Rows);
    for (int64_t q0 = 0; q0 < kc; q0 += 16) {
      const int64_t depth = std::min<int64_t>(16, kc - q0);
      const __mmask16 lanes = lanes_below(depth);
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < live ? _mm512_maskz_loadu_ps(lanes, x + (g * kF32Rows + i) * ldx + q0) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t q = 0; q < depth; ++q) _mm512_mask_storeu_ps(ag + (q0 + q) * kF32Rows, 0x0FFF, r[q]);
    }
  }
}

// The same row groups from x stored by k, x [kc, rows] (row stride ldx, so x^T's rows): a plain copy of 12 floats
// per k.
inline void pack_row_groups_t(const float *x, int64_t ldx, int64_t rows, int64_t kc, float *a) {
  for (int64_t g = 0; g * kF32Rows < rows; ++g) {
    float *ag = a + g * kc * kF32Rows;
    const __mmask16 live = lanes_below(std::min<int64_t>(kF32Rows, rows - g * kF32Rows));
    for (int64_t q = 0; q < kc; ++q)
      _mm512_mask_storeu_ps(ag + q * kF32Rows, 0x0FFF, _mm512_maskz_loadu_ps(live, x + q * ldx + g * kF32Rows));
  }
}

// y [m, n] (row stride ldy) = (or +=, accumulate) x [m, k] (row stride ldx) @ W^T, W packed; a: f32_scratch(k)
// floats. One worker's share: call from inside a parallel region after W is packed, or from one thread. With
// x_by_k, x is stored transposed, [k, m] (row stride ldx): y = x^T-as-stored @ W^T.
void gemm_f32(const float *x, int64_t ldx, int64_t m, const F32Weight &w, float *y, int64_t ldy, float *a,
              bool accumulate = false, bool x_by_k = false) {
  f32gemm_calls.fetch_add(1, std::memory_order_relaxed);
  for (int64_t p0 = 0; p0 < w.panels; p0 += kF32BlockPanels)
  for (int64_t r0 = 0; r0 < m; r0 += kF32ChunkRows) {
    const int64_t mr = std::min(kF32ChunkRows, m - r0), groups = (mr + kF32Rows - 1) / kF32Rows;
    for (int64_t k0 = 0; k0 < w.k; k0 += w.kblock) {
      const int64_t kc = std::min(w.kblock, w.k - k0);
      if (x_by_k)
        pack_row_groups_t(x + k0 * ldx + r0, ldx, mr, kc, a);
      else
        pack_row_groups(x + r0 * ldx + k0, ldx, mr, kc, a);
      const int64_t pend = std::min(w.panels, p0 + kF32BlockPanels);
      for (int64_t p = p0; p < pend; ++p) {
        const int64_t c0 = p * kF32Cols, cols = std::min(kF32Cols, w.n - c0);
        const __mmask16 m0 = lanes_below(cols), m1 = lanes_below(cols - 16 > 0 ? cols - 16 : 0);
        const float *b = w.at(p, k0);
        // The last row group prefetches the next panel's slice into L1 (a whole-k slice would not fit there).
        for (int64_t g = 0; g < groups; ++g)
          f32_block(a + g * kc * kF32Rows, b, kc, y + (r0 + g * kF32Rows) * ldy + c0, ldy,
                    std::min<int64_t>(kF32Rows, mr - g * kF32Rows), m0, m1, k0 > 0 || accumulate,
                    g == groups - 1 && p + 1 < pend && kc <= kF32BlockK ? b + kc * kF32Cols : nullptr);
      }
    }
  }
}
// c [m, n] (row stride ldc) = a^T b for a [k, m] (row stride lda) and b [k, n] (ldb), by the calling thread alone:
// a weight gradient over k tokens (train_kernels.cc's par_weight_grads, one slice of tokens per worker). b is
// packed as W stored [k, n], a's columns are the rows; both buffers are the thread's own.
void gemm_f32_tn(const float *a, int64_t lda, int64_t m, const float *b, int64_t ldb, int64_t n, int64_t k, float *c,
                 int64_t ldc) {
  F32Weight w;
  w.allocate(n, k, f32_arena<1>(f32_packed_size(n, k)));
  w.pack_kn_serial(b, ldb);
  gemm_f32(a, lda, m, w, c, ldc, f32_arena<2>(f32_scratch(k)), false, true);
}
#else
inline int64_t f32_packed_size(int64_t, int64_t) { return 0; }
template <int Slot = 0>
inline float *f32_arena(int64_t) { return nullptr; }
struct F32Weight {   // without AVX-512 nothing is packed and the BLAS computes every product
  void allocate(int64_t, int64_t, float *) {}
  void pack(const float *, int64_t) {}
  void pack_kn(const float *, int64_t) {}
};
inline int64_t f32_scratch(int64_t) { return 0; }
inline void gemm_f32(const float *, int64_t, int64_t, const F32Weight &, float *, int64_t, float *, bool = false,
                     bool = false) {}
inline void gemm_f32_tn(const float *, int64_t, int64_t, const float *, int64_t, int64_t, int64_t, float *, int64_t) {}
#endif  // __AVX512F__

// Switched on (the default; BGEM3_F32GEMM=0 in the environment: off), off (the BLAS) or on for packed-ahead
// weights only by m3_f32gemm / m3t_f32gemm (kernels/cpu.py chooses at load; tests and benchmarks); below 64 rows
// per call the BLAS computes (W is packed once per call unless packed ahead).
PathSwitch f32gemm_path{"BGEM3_F32GEMM", 64};

inline bool f32gemm_on(int64_t rows, bool prepacked = false) {
#if defined(__AVX512F__)
  return f32gemm_path.wants(rows, prepacked);
#else
  (void)rows, (void)prepacked;
  return false;
#endif
}

// The switch behind m3_f32gemm / m3t_f32gemm (PathSwitch::set); 1 if calls at the threshold now run here.
inline int f32gemm_switch(int on, int64_t min_rows) {
  return f32gemm_path.set(on, min_rows, [](int64_t rows) { return f32gemm_on(rows); });
}

}  // namespace

#endif  // BGEM3_GEMM_F32_H_
