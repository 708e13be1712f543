// Helpers shared by the fused CPU kernels (cpu_kernels.cc: float32; int8_kernels.cc: int8 linears):
// the dlopen'ed OpenBLAS sgemm, exp / erf-GELU approximations, fused bias + residual + layer norm,
// per-sequence attention on packed tokens. Everything has internal linkage (one copy per library).
//
// Compile-time defines (set by kernels/cpu.py): BGEM3_BLAS_LIB, BGEM3_SGEMM, BGEM3_SET_THREADS,
// BGEM3_GET_THREADS, BGEM3_BLAS_INT.
#ifndef BGEM3_KERNELS_COMMON_H_
#define BGEM3_KERNELS_COMMON_H_

#include <dlfcn.h>
#include <omp.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "block_cache.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>   // AVX-512 where compiled for it; train_kernels.cc's F16C path without it
#endif

namespace {

typedef BGEM3_BLAS_INT blas_int;
typedef void (*sgemm_fn)(int, int, int, blas_int, blas_int, blas_int, float, const float *, blas_int,
                         const float *, blas_int, float, float *, blas_int);
typedef void (*set_threads_fn)(blas_int);
typedef blas_int (*get_threads_fn)(void);

const int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// Uninitialised float scratch: every kernel writes its buffers before reading them, and std::vector's
// zero fill was 3% of an M3-small encode (perf, 8 x 512 tokens).

// Allocator for buffers the AMX tile unit reads: 64-byte aligned, so that no 64-byte tile row straddles two cache
// lines (with new[]'s 16-byte alignment every row did, and tile loads ran at about half their rate).
// E.g. std::vector<uint16_t, Aligned64<uint16_t>> v(512); (uintptr_t)v.data() % 64 == 0.
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U> &) {}
  T *allocate(size_t n) {
    void *p = std::aligned_alloc(64, (std::max<size_t>(n, 1) * sizeof(T) + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T *>(p);
  }
  void deallocate(T *p, size_t) { std::free(p); }
  template <class U>
  bool operator==(const Aligned64<U> &) const { return true; }
  template <class U>
  bool operator!=(const Aligned64<U> &) const { return false; }
};
template <class T>
using AlignedVector = std::vector<T, Aligned64<T>>;

// The same without the zero fill: n uninitialised values, 64-byte aligned; from 1 MiB on out of block_cache.h's
// cached mappings (kept from one call to the next), below that from malloc.
struct FreeDeleter {
  size_t cached = 0;   // the BlockCache block's size, or 0: malloc'ed
  void operator()(void *p) const {
    if (cached) BlockCache::get().give(p, cached);
    else std::free(p);
  }
};
template <class T>
using AlignedArray = std::unique_ptr<T[], FreeDeleter>;
template <class T>
AlignedArray<T> aligned_array(int64_t n) {
  const size_t count = n > 0 ? (size_t)n : 1;
  size_t bytes = count * sizeof(T);
  if (bytes < BlockCache::kMinBytes) return AlignedArray<T>(Aligned64<T>().allocate(count));
  T *p = static_cast<T *>(BlockCache::get().take(bytes));
  return AlignedArray<T>(p, FreeDeleter{bytes});
}

// Uninitialised float scratch (64-byte aligned): every kernel writes its buffers before reading them, and
// std::vector's zero fill was 3% of an M3-small encode (perf, 8 x 512 tokens).
struct Scratch {
  AlignedArray<float> p;
  explicit Scratch(int64_t n) : p(aligned_array<float>(n)) {}
  float *data() { return p.get(); }
};

struct Blas {
  sgemm_fn sgemm = nullptr;
  set_threads_fn set_threads = nullptr;
  get_threads_fn get_threads = nullptr;
  Blas() {
    void *h = dlopen(BGEM3_BLAS_LIB, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (!h) h = dlopen(BGEM3_BLAS_LIB, RTLD_NOW | RTLD_LOCAL);
    if (!h) return;
    sgemm = (sgemm_fn)dlsym(h, BGEM3_SGEMM);
    set_threads = (set_threads_fn)dlsym(h, BGEM3_SET_THREADS);
    get_threads = (get_threads_fn)dlsym(h, BGEM3_GET_THREADS);
  }
};

const Blas &blas() {
  static Blas b;
  return b;
}

// C[m, n] = alpha * A[m, k] @ op(B) (+ beta * C); op(B) = B^T when b_trans (B stored [n, k]).
void gemm(bool b_trans, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
          const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
  blas().sgemm(kRowMajor, kNoTrans, b_trans ? kTrans : kNoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// exp(x) by 2^n * p(f), f = x - n ln2 in [-ln2/2, ln2/2], p the degree-7 Taylor polynomial
// (relative error < 1e-8 before rounding); branch-free so the loops below vectorise.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float round = 12582912.0f;                   // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + round) - round;
  float f = x - n * 0.693145751953125f - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// erfc(z) for z >= 0 by the Chebyshev fit t*exp(-z^2 + P(t)), t = 1/(1 + z/2) (Numerical Recipes
// erfcc, fractional error < 1.2e-7); GELU(x) = x * Phi(x) = x * (1 - erfc(x/sqrt2)/2) for x >= 0
// and x * erfc(-x/sqrt2)/2 for x < 0, which keeps the relative accuracy in the negative tail.
inline float normal_cdf(float x) {  // Phi(x)
  float z = std::fabs(x) * 0.70710678118654752f;
  float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  float half_erfc = 0.5f * t * fast_exp(-z * z + p);
  return x >= 0.0f ? 1.0f - half_erfc : half_erfc;
}

inline float gelu_erf(float x) { return x * normal_cdf(x); }

#if defined(__AVX512F__)
// fast_exp on 16 lanes: same clamp, same reduction and polynomial; 2^n applied by scalef.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), f);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// normal_cdf on 16 lanes: the same erfc fit and the same two branches, as a blend.
inline __m512 normal_cdf16(__m512 x) {
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_set1_ps(0.5f), z, _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(0.17087277f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.82215223f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.48851587f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.13520398f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.27886807f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.18628806f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.09678418f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.37409196f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.00002368f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.26551223f));
  const __m512 half_erfc = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), t),
                                         exp16(_mm512_fnmadd_ps(z, z, p)));
  const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
  return _mm512_mask_sub_ps(half_erfc, positive, _mm512_set1_ps(1.0f), half_erfc);
}

// gelu_erf on 16 lanes.
inline __m512 gelu16(__m512 x) { return _mm512_mul_ps(x, normal_cdf16(x)); }
#endif  // __AVX512F__

// A row's mean and 1 / sqrt(biased variance + eps), as LayerNorm takes them.
inline void norm_moments(const float *row, int64_t h, float eps, float *mean_out, float *inv_out) {
  float sum = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < h; ++j) sum += row[j];
  const float mean = sum / (float)h;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < h; ++j) sq += (row[j] - mean) * (row[j] - mean);
  *mean_out = mean;
  *inv_out = 1.0f / std::sqrt(sq / (float)h + eps);
}

// row <- LayerNorm(row + bias + residual) * gamma + beta  (biased variance, eps inside the sqrt).
inline void add_layer_norm(float *row, const float *bias, const float *res, const float *gamma,
                           const float *beta, int64_t h, float eps) {
  if (res) {
    for (int64_t j = 0; j < h; ++j) row[j] += bias[j] + res[j];
  } else {
    for (int64_t j = 0; j < h; ++j) row[j] += bias[j];
  }
  float mean, inv;
  norm_moments(row, h, eps, &mean, &inv);
  for (int64_t j = 0; j < h; ++j) row[j] = (row[j] - mean) * inv * gamma[j] + beta[j];
}

// For the duration of a kernel, OpenMP owns the cores and every BLAS call runs single-threaded on
// the worker that makes it (two thread pools spinning against each other cost more than they give).
struct SingleThreadedBlas {
  blas_int saved = 1;
  SingleThreadedBlas() {
    if (blas().get_threads && blas().set_threads && (saved = blas().get_threads()) != 1) blas().set_threads(1);
  }
  ~SingleThreadedBlas() {
    if (saved != 1 && blas().set_threads) blas().set_threads(saved);
  }
};

// Rows per work item: all workers busy, at most 512 (a [512, 4H] scratch per worker).
int64_t row_block(int64_t rows) {
  int64_t workers = omp_get_max_threads(), b = (rows + workers - 1) / workers;
  b = b < 16 ? 16 : (b > 512 ? 512 : b);
  return b;
}

void add_bias(float *r, const float *bias, int64_t n, bool gelu) {
  if (gelu) {
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= n; j += 16)
      _mm512_storeu_ps(r + j, gelu16(_mm512_add_ps(_mm512_loadu_ps(r + j), _mm512_loadu_ps(bias + j))));
#endif
    for (; j < n; ++j) r[j] = gelu_erf(r[j] + bias[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) r[j] += bias[j];
  }
}

// Scaled dot-product attention of one (sequence, head, block of query rows) on the sequence's own
// tokens. qkv [T, 3H] (query | key | value, heads side by side), ctx [T, H], scratch of
// attention_scratch(d, longest, qblock) floats.
//
// With AVX-512 and d % 16 == 0 (M3-small: d = 32, XLM-R large: d = 64) a register-tiled kernel runs:
// the head's keys are packed once per task in panels kp [npad / 32, d, 32] (npad = n rounded up to
// 32) and its values contiguous vp [n, d]; then 32 query rows (4 tiles of 8) at a time: scores [32, npad] =
// (q / sqrt d) @ K^T with 8 x 32 accumulators in registers per tile, a masked row softmax (max, exp, sum),
// and ctx [32, d] = p @ vp, 8 rows x 32 (or 16) columns of accumulators per tile, over blocks of keys.
// OpenBLAS's sgemm is slow on these skinny products (k = d = 32): the attention core of M3-small at
// 16 x 512 tokens ran at about 60-95 GFLOP/s through it on 2 cores and about twice that tiled
// (/tmp harness, ctypes; benchmarks/encode.py measures the whole model). Elsewhere: OpenBLAS.
struct AttentionTask { int64_t start, n, head, row0, rows, seq; };

const int64_t kTileRows = 8;
// Query rows that share each pass over the keys and values: 4 tiles of 8. One tile per pass read the head's
// K and V (2 x 2 MiB at d = 64, n = 8192, beyond L2) from L3 once per 8 rows, and the kernel was bound by
// that stream at full size; a 32-row group reads each K panel (d x 32) four times from L1, and V in
// blocks of kKeyBlock keys that stay in L1 across the group's tiles.
const int64_t kGroupTiles = 4, kGroupRows = kGroupTiles * kTileRows, kKeyBlock = 128;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Row stride of the scores [8, .]: n rounded up to 32, plus 16 floats so that rows are never a multiple
// of 4 KiB apart (L1 set conflicts at n = 8192).
inline int64_t key_stride(int64_t n) { return round_up(n, 32) + 16; }

// Floats of per-worker scratch either attention path needs.
int64_t attention_scratch(int64_t d, int64_t longest, int64_t qblock) {
  const int64_t stride = key_stride(longest);
  return std::max(std::min(qblock, longest) * longest, 2 * d * stride + kGroupRows * stride + 2 * kGroupRows * d);
}

#if defined(__AVX512F__)
inline __mmask16 lanes_below(int64_t count) {  // the first min(count, 16) lanes
  return count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1u);
}

// s [8 g, ld] = qt [8 g, d] @ K^T over the first npad (a multiple of 32) keys for g = 0..tiles-1, 32 keys per
// pass; K^T is packed in panels kp [npad / 32, d, 32], so each pass reads one contiguous d x 32 block, which
// every tile of the group then reuses from L1.
inline void group_scores(const float *qt, int64_t tiles, const float *kp, int64_t d, int64_t npad, int64_t ld,
                         float *s) {
  for (int64_t j0 = 0; j0 < npad; j0 += 32) {
    const float *panel = kp + j0 * d;
    for (int64_t g = 0; g < tiles; ++g) {
      const float *q = qt + g * kTileRows * d;
      float *sg = s + g * kTileRows * ld;
      __m512 acc[kTileRows][2];
      for (int r = 0; r < kTileRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (int64_t c = 0; c < d; ++c) {
        const __m512 k0 = _mm512_loadu_ps(panel + 32 * c), k1 = _mm512_loadu_ps(panel + 32 * c + 16);
        for (int r = 0; r < kTileRows; ++r) {
          const __m512 qr = _mm512_set1_ps(q[r * d + c]);
          acc[r][0] = _mm512_fmadd_ps(qr, k0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(qr, k1, acc[r][1]);
        }
      }
      for (int r = 0; r < kTileRows; ++r) {
        _mm512_storeu_ps(sg + r * ld + j0, acc[r][0]);
        _mm512_storeu_ps(sg + r * ld + j0 + 16, acc[r][1]);
      }
    }
  }
}

// Row r of s [., ld] over its first n entries <- exp(s - max); returns 1 / sum.
inline float softmax_row(float *row, int64_t n) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16)
    mx = _mm512_mask_max_ps(mx, lanes_below(n - j), mx, _mm512_loadu_ps(row + j));
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes_below(n - j);
    const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), shift)));
    _mm512_mask_storeu_ps(row + j, m, e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// acc[r, 0:W*16] (+)= sum_{j0 <= j < j1} p[r, j] v[j, 0:W*16] for the 8 rows of a tile (acc row stride lda;
// ``first`` starts from zero). The accumulators live in registers over the block; the loads and stores
// bounded by constants keep GCC from spilling them on every step of the j loop.
template <int W>
inline void tile_context_block(const float *p, int64_t ldp, const float *v, int64_t ldv, int64_t j0, int64_t j1,
                               bool first, float *acc_out, int64_t lda) {
  __m512 acc[kTileRows][W];
  for (int r = 0; r < kTileRows; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_out + r * lda + 16 * w);
  for (int64_t j = j0; j < j1; ++j) {
    __m512 vj[W];
    for (int w = 0; w < W; ++w) vj[w] = _mm512_loadu_ps(v + j * ldv + 16 * w);
    for (int r = 0; r < kTileRows; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r * ldp + j]);
      for (int w = 0; w < W; ++w) acc[r][w] = _mm512_fmadd_ps(pr, vj[w], acc[r][w]);
    }
  }
  for (int r = 0; r < kTileRows; ++r)
    for (int w = 0; w < W; ++w) _mm512_storeu_ps(acc_out + r * lda + 16 * w, acc[r][w]);
}

// Flush-to-zero and denormals-are-zero for the life of the object (this thread's MXCSR, restored after).
// Softmax weights of far-off keys are tiny, and their products with v fall below 2^-126; each denormal
// costs a microcode assist, which made the context pass four times slower at n = 8192. What is
// flushed is below 1e-38 of a sum that is at least 1.
struct FlushDenormals {
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
};

// out[r, 0:d] (row stride ld) = acc[r, 0:d] * inv[r] for the group's first m rows: the softmax's 1 / sum applied
// to the unnormalised context (d a multiple of 16).
inline void store_context(const float *acc, const float *inv, int64_t m, int64_t d, float *out, int64_t ld) {
  for (int64_t r = 0; r < m; ++r) {
    const __m512 f = _mm512_set1_ps(inv[r]);
    for (int64_t c = 0; c < d; c += 16)
      _mm512_storeu_ps(out + r * ld + c, _mm512_mul_ps(f, _mm512_loadu_ps(acc + r * d + c)));
  }
}

void attend_tiled(const AttentionTask &t, const float *qkv, int64_t hidden, int64_t d, float *scratch, float *ctx) {
  FlushDenormals ftz;
  const int64_t ld = 3 * hidden, npad = round_up(t.n, 32), lk = key_stride(t.n);
  const float *q = qkv + (t.start + t.row0) * ld + t.head * d;
  const float *k = qkv + t.start * ld + hidden + t.head * d;
  const float *v = k + hidden;
  // This head's keys and values, packed once per task: qkv rows are 12 H bytes apart, a page or more at
  // full size, where the hardware prefetcher does not follow, and at n = 8192 the strided reads ran at a
  // fifth of the packed speed.
  float *kp = scratch, *vp = kp + d * npad, *s = vp + d * npad, *qt = s + kGroupRows * lk, *acc = qt + kGroupRows * d;
  for (int64_t j0 = 0; j0 < npad; j0 += 32)
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = j0; j < j0 + 32; ++j) kp[j0 * d + 32 * c + (j - j0)] = j < t.n ? k[j * ld + c] : 0.0f;
  for (int64_t j = 0; j < t.n; ++j) std::memcpy(vp + j * d, v + j * ld, d * sizeof(float));
  const float scale = 1.0f / std::sqrt((float)d);
  // Key blocks only where K and V outgrow L2 (1 MiB together): below that one pass over the keys reads them
  // from L2 anyway, and each block costs a store and reload of the accumulators (2% slower at d = 32, n = 2048).
  const int64_t kb = 2 * t.n * d * (int64_t)sizeof(float) <= (1 << 20) ? t.n : kKeyBlock;
  for (int64_t r0 = 0; r0 < t.rows; r0 += kGroupRows) {
    const int64_t m = std::min(kGroupRows, t.rows - r0), tiles = (m + kTileRows - 1) / kTileRows;
    for (int64_t r = 0; r < tiles * kTileRows; ++r)
      for (int64_t c = 0; c < d; ++c) qt[r * d + c] = r < m ? q[(r0 + r) * ld + c] * scale : 0.0f;
    group_scores(qt, tiles, kp, d, npad, lk, s);
    float inv[kGroupRows];
    for (int64_t r = 0; r < tiles * kTileRows; ++r) inv[r] = r < m ? softmax_row(s + r * lk, t.n) : 0.0f;
    for (int64_t j0 = 0; j0 < t.n; j0 += kb) {        // V in blocks that stay in L1 over the group
      const int64_t j1 = std::min(t.n, j0 + kb);
      for (int64_t g = 0; g < tiles; ++g) {
        const float *p = s + g * kTileRows * lk;
        float *a = acc + g * kTileRows * d;
        int64_t c0 = 0;
        for (; c0 + 32 <= d; c0 += 32) tile_context_block<2>(p, lk, vp + c0, d, j0, j1, j0 == 0, a + c0, d);
        if (c0 < d) tile_context_block<1>(p, lk, vp + c0, d, j0, j1, j0 == 0, a + c0, d);
      }
    }
    store_context(acc, inv, m, d, ctx + (t.start + t.row0 + r0) * hidden + t.head * d, hidden);
  }
}
#endif  // __AVX512F__

// The same attention through OpenBLAS: scores [rows, n] = q @ k^T, row softmax, ctx = p @ v.
void attend_blas(const AttentionTask &t, const float *qkv, int64_t hidden, int64_t d, float *scores, float *ctx) {
  const int64_t ld = 3 * hidden;
  const float *q = qkv + (t.start + t.row0) * ld + t.head * d;
  const float *k = qkv + t.start * ld + hidden + t.head * d;
  const float *v = qkv + t.start * ld + 2 * hidden + t.head * d;
  gemm(true, t.rows, t.n, d, 1.0f / std::sqrt((float)d), q, ld, k, ld, 0.0f, scores, t.n);
  for (int64_t r = 0; r < t.rows; ++r) {
    float *row = scores + r * t.n, mx = row[0], sum = 0.0f;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 1; j < t.n; ++j) mx = row[j] > mx ? row[j] : mx;
    for (int64_t j = 0; j < t.n; ++j) row[j] = fast_exp(row[j] - mx);
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < t.n; ++j) sum += row[j];
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < t.n; ++j) row[j] *= inv;
  }
  gemm(false, t.rows, d, t.n, 1.0f, scores, t.n, v, ld, 0.0f, ctx + (t.start + t.row0) * hidden + t.head * d, hidden);
}

// BGEM3_ATTENTION_BLAS=1 in the environment: attention on OpenBLAS whatever the CPU has (for comparison).
inline bool attention_blas_forced() {
  static const bool forced = [] {
    const char *e = std::getenv("BGEM3_ATTENTION_BLAS");
    return e && e[0] == '1';
  }();
  return forced;
}

// Tiled kernel where it applies, OpenBLAS otherwise.
void attend(const AttentionTask &t, const float *qkv, int64_t hidden, int64_t d, float *scratch, float *ctx) {
#if defined(__AVX512F__)
  if (d % 16 == 0 && !attention_blas_forced()) return attend_tiled(t, qkv, hidden, d, scratch, ctx);
#endif
  attend_blas(t, qkv, hidden, d, scratch, ctx);
}

// The attention tasks of packed tokens: one per (sequence, head, block of <= qblock query rows). False
// unless offsets [batch + 1] partition [0, rows); longest = the longest sequence (at least 1).
bool attention_tasks(const int32_t *offsets, int64_t batch, int64_t heads, int64_t rows, int64_t qblock,
                     std::vector<AttentionTask> &tasks, int64_t &longest) {
  if (offsets[0] != 0 || offsets[batch] != rows) return false;
  longest = 1;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t start = offsets[b], n = offsets[b + 1] - offsets[b];
    if (n < 0) return false;
    longest = std::max(longest, n);
    for (int64_t a = 0; a < heads; ++a)
      for (int64_t r = 0; r < n; r += qblock) tasks.push_back({start, n, a, r, std::min(qblock, n - r), b});
  }
  return true;
}

int64_t numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}

}  // namespace

#endif  // BGEM3_KERNELS_COMMON_H_
