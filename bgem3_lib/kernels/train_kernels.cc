// Fused float32 CPU kernels for *training* one post-LN encoder layer (MindSpore ops.Custom, func_type="aot"):
// a forward that also returns what its backward needs, and that backward, for the self-attention and the
// feed-forward sub-layers of encoder.Layer, plus a row gather / scatter to pack and unpack padded batches.
// kernels/train.py wires them into ops.Custom with bprop, so mindspore.value_and_grad differentiates them.
//
// Tokens are packed: x [T, H], sequence b in rows offsets[b] .. offsets[b+1]-1 (no padding, no mask).
// Attention probabilities are stored per (sequence b, head a) as a row-major [n_b, n_b] block at
// heads * sum_{c<b} n_c^2 + a * n_b^2 of one flat buffer [heads * sum_b n_b^2].
//
// Threads: one OpenMP parallel region per kernel; every BLAS call runs single-threaded on the worker that
// makes it (SingleThreadedBlas). Products of token rows with a weight run per chunk of rows (par_chunks: a
// multiple of the workers in number, dealt out dynamically) together with the row passes before and after them
// (LayerNorm and its backward, GELU and its backward, bias column sums), while the chunk is in cache and without
// a barrier between a compute-bound and a memory-bound phase; the query / key / value projections are one
// product with 3H columns (forward) or 3H inner size (backward). Weight gradients (sums over tokens) are split
// along the tokens, one slice per worker, the slices added in slice order (par_weight_grads). The (sequence,
// head) pairs of attention are one task each, longest first. With AVX-512 and a head size that is a
// multiple of 16 the per-head products use kernels_common.h's register tiles (group_scores, softmax_row,
// tile_context_block) and transposed_tile, otherwise OpenBLAS; BGEM3_ATTENTION_BLAS=1 forces OpenBLAS. Column
// sums (bias, gamma, beta gradients) are taken per fixed block of kRows rows and then added in block order, so
// the gradients do not depend on which worker ran which block. Large work buffers are extra outputs
// (MindSpore's memory pool reuses them; a fresh malloc of this size is an mmap whose pages fault in on every
// call). -DM3T_PROFILE (and -DM3T_PROFILE_CPU) compiles in per-phase timers (PROF, m3t_prof_get).
//
// Kernel ABI (MindSpore aot): int f(int nparam, void **params, int *ndims, int64_t **shapes,
//                                   const char **dtypes, void *stream, void *extra); inputs then outputs.
#include <cmath>
#include <limits>
#include <map>
#include <mutex>

#include "kernels_common.h"
#include "gemm_bf16x3.h"

namespace {

const int64_t kRows = 128;  // rows per work item of the row-parallel passes (and per column-sum partial)
#ifndef M3T_CHUNK
#define M3T_CHUNK 1024
#endif
const int64_t kChunkRows = M3T_CHUNK;  // at most this many rows per chunk of the fused row-chunk phases

inline int64_t blocks_of(int64_t rows) { return (rows + kRows - 1) / kRows; }

// Phase timing for development (-DM3T_PROFILE): PROF_START before a kernel's parallel region, PROF(name) after
// each phase inside it (a barrier, then the master thread adds the time since the last mark to name's total);
// m3t_prof_get / m3t_prof_reset read and clear the totals through ctypes. Compiled out otherwise.
#ifdef M3T_PROFILE
double prof_total[64], prof_last;
const char *prof_name[64];
int prof_count;
#ifdef M3T_PROFILE_CPU  // the master thread's CPU time (with OMP_NUM_THREADS=1: robust to other load)
inline double prof_now() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}
#else
inline double prof_now() { return omp_get_wtime(); }
#endif
inline void prof_mark(const char *name) {
  const double now = prof_now();
  int i = 0;
  while (i < prof_count && prof_name[i] != name) ++i;
  if (i == prof_count && prof_count < 64) prof_name[prof_count++] = name;
  if (i < 64) prof_total[i] += now - prof_last;
  prof_last = prof_now();
}
#define PROF_START() (prof_last = prof_now())
#define PROF(name) _Pragma("omp barrier") _Pragma("omp master") prof_mark(name);
#else
#define PROF_START() ((void)0)
#define PROF(name)
#endif

// C [m, n] = alpha op(A) @ op(B) + beta C, op = transpose where ta / tb.
inline void sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
                  const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // BLAS leaves C alone when k = 0; the product is zero
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  blas().sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c,
               ldc);
}

// A weight gradient C [m, n] = A^T B for A [k, m] (row stride lda), B [k, n] (ldb), k = tokens; row i of C goes
// to outs[i / each] + (i % each) * n (the fused query / key / value gradient goes to three tensors).
struct WeightGrad {
  int64_t m, n;
  const float *a;
  int64_t lda;
  const float *b;
  int64_t ldb;
  float *const *outs;
  int64_t each;
};

// The weight gradients gs[0 .. count) (k rows each), called by every worker: the k rows cut into one contiguous
// slice per worker, each worker one single-threaded product of its slice per gradient into part, then each row
// of each C = its slices' rows added in slice order. Splitting along k packs each operand once (split along n,
// every chunk packed all of A again), the sum does not depend on which worker ran which slice, and the
// gradients of a sub-layer share one pass (one barrier). part: workers * sum(m * n) floats. Ends with a barrier.
void par_weight_grads(const WeightGrad *gs, int count, int64_t k, float *part) {
  const int64_t pieces = omp_get_num_threads(), slice = round_up((k + pieces - 1) / pieces, 16);
  int64_t size = 0, rows = 0;
  for (int g = 0; g < count; ++g) size += gs[g].m * gs[g].n, rows += gs[g].m;
#pragma omp for schedule(static, 1)
  for (int64_t p = 0; p < pieces; ++p) {
    const int64_t k0 = std::min(k, p * slice), len = std::min(slice, k - k0);
    float *dst = part + p * size;
    for (int g = 0; g < count; ++g) {
      const WeightGrad &w = gs[g];
      float *c = p == 0 && w.each == w.m ? w.outs[0] : dst;  // slice 0 of a one-tensor gradient: in place
      if (len > 0 && f32gemm_on(w.m))      // AVX-512 registers (gemm_f32.h), else the BLAS
        gemm_f32_tn(w.a + k0 * w.lda, w.lda, w.m, w.b + k0 * w.ldb, w.ldb, w.n, len, c, w.n);
      else
        sgemm(true, false, w.m, w.n, len, 1.0f, w.a + k0 * w.lda, w.lda, w.b + k0 * w.ldb, w.ldb, 0.0f, c, w.n);
      dst += w.m * w.n;
    }
  }
#pragma omp for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    int g = 0;
    int64_t i = r, at = 0;
    while (i >= gs[g].m) at += gs[g].m * gs[g].n, i -= gs[g++].m;
    const int64_t n = gs[g].n;
    float *o = gs[g].outs[i / gs[g].each] + (i % gs[g].each) * n;
    const float *src = part + at + i * n;
    if (gs[g].each != gs[g].m) std::memcpy(o, src, n * sizeof(float));
    for (int64_t p = 1; p < pieces; ++p) {
      const float *q = src + p * size;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j] += q[j];
    }
  }
}

// Rows [0, rows) in chunks of whole kRows blocks dealt out dynamically, body(r0, n) per chunk (a product of the
// chunk's rows with a weight and the row passes before / after it, while the chunk is in cache; the workers'
// compute- and memory-bound phases overlap instead of meeting at a barrier between them). Ends with a barrier.
// Chunks: a multiple of the workers in number, each at most about kChunkRows rows (smaller ones cost OpenBLAS a
// packing of the weight per chunk; one chunk per worker leaves no slack for dynamic balancing).
inline int64_t chunk_rows(int64_t rows) {
  const int64_t workers = omp_get_num_threads();
  const int64_t chunks = workers * std::max<int64_t>(1, (rows + workers * kChunkRows - 1) / (workers * kChunkRows));
  return std::max<int64_t>(kRows, round_up((rows + chunks - 1) / chunks, kRows));
}

template <class Body>
void par_chunks(int64_t rows, Body body) {
  const int64_t chunk = chunk_rows(rows);
#pragma omp for schedule(dynamic, 1)
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) body(r0, std::min(chunk, rows - r0));
}

// out[j] = sum over blocks of part[blk * width + j] (block order: deterministic); called by every worker.
void reduce_blocks(const float *part, int64_t blocks, int64_t width, float *const *outs, int64_t each) {
#pragma omp for schedule(static)
  for (int64_t j = 0; j < width; ++j) {
    float s = 0.0f;
    for (int64_t blk = 0; blk < blocks; ++blk) s += part[blk * width + j];
    outs[j / each][j % each] = s;
  }
}

// row <- LayerNorm(row + bias + res) * gamma + beta, keeping xhat = (z - mean) * rstd and rstd.
inline void add_layer_norm_save(float *row, const float *bias, const float *res, const float *gamma,
                                const float *beta, int64_t h, float eps, float *xhat, float *rstd) {
  for (int64_t j = 0; j < h; ++j) row[j] += bias[j] + res[j];
  float mean, inv;
  norm_moments(row, h, eps, &mean, &inv);
  for (int64_t j = 0; j < h; ++j) {
    const float xh = (row[j] - mean) * inv;
    xhat[j] = xh;
    row[j] = xh * gamma[j] + beta[j];
  }
  *rstd = inv;
}

// Backward of y = xhat * gamma + beta, xhat = (z - mean) * rstd for one row: dz, and the row's share of
// dgamma (dy * xhat), dbeta (dy) and dbias (dz, the gradient of the bias added before the norm).
inline void layer_norm_backward_row(const float *dy, const float *xhat, float rstd, const float *gamma, int64_t h,
                                    float *dz, float *dgamma, float *dbeta, float *dbias) {
  float mg = 0.0f, mgx = 0.0f;
#pragma omp simd reduction(+ : mg, mgx)
  for (int64_t j = 0; j < h; ++j) {
    const float g = dy[j] * gamma[j];
    mg += g;
    mgx += g * xhat[j];
  }
  mg /= (float)h;
  mgx /= (float)h;
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) {
    const float d = rstd * (dy[j] * gamma[j] - mg - xhat[j] * mgx);
    dz[j] = d;
    dgamma[j] += dy[j] * xhat[j];
    dbeta[j] += dy[j];
    dbias[j] += d;
  }
}

// Rows [r0, r0+n) of the LayerNorm backward: dz rows, and block partials [dgamma | dbeta | dbias] (3h).
void layer_norm_backward_block(const float *dy, const float *xhat, const float *rstd, const float *gamma, int64_t h,
                               int64_t r0, int64_t n, float *dz, float *part) {
  std::fill(part, part + 3 * h, 0.0f);
  for (int64_t i = r0; i < r0 + n; ++i)
    layer_norm_backward_row(dy + i * h, xhat + i * h, rstd[i], gamma, h, dz + i * h, part, part + h, part + 2 * h);
}

inline void colsum_block(const float *m, int64_t width, int64_t r0, int64_t n, float *part) {
  std::fill(part, part + width, 0.0f);
  for (int64_t i = r0; i < r0 + n; ++i) {
    const float *row = m + i * width;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) part[j] += row[j];
  }
}

// GELU(x) = x Phi(x) and GELU'(x) = Phi(x) + x phi(x), Phi by kernels_common.h's erfc fit (normal_cdf), in one
// pass: the forward keeps GELU' for the backward instead of the GELU input.
inline void gelu_and_grad(float x, float *g, float *dg) {
  const float phi = normal_cdf(x);
  *g = x * phi;
  *dg = phi + x * 0.39894228040143268f * fast_exp(-0.5f * x * x);
}

#if defined(__AVX512F__)
inline void gelu_and_grad16(__m512 x, __m512 *g, __m512 *dg) {
  const __m512 phi = normal_cdf16(x);
  const __m512 pdf = _mm512_mul_ps(_mm512_set1_ps(0.39894228040143268f),
                                   exp16(_mm512_mul_ps(_mm512_set1_ps(-0.5f), _mm512_mul_ps(x, x))));
  *g = _mm512_mul_ps(x, phi);
  *dg = _mm512_fmadd_ps(x, pdf, phi);
}
#endif

// Rows [r0, r0+n) of width f: h = pre + bias, act = GELU(h), pre <- GELU'(h).
void bias_gelu_rows(float *pre, const float *bias, float *act, int64_t r0, int64_t n, int64_t f) {
  for (int64_t i = r0; i < r0 + n; ++i) {
    float *p = pre + i * f, *a = act + i * f;
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= f; j += 16) {
      __m512 g, dg;
      gelu_and_grad16(_mm512_add_ps(_mm512_loadu_ps(p + j), _mm512_loadu_ps(bias + j)), &g, &dg);
      _mm512_storeu_ps(a + j, g);
      _mm512_storeu_ps(p + j, dg);
    }
#endif
    for (; j < f; ++j) gelu_and_grad(p[j] + bias[j], a + j, p + j);
  }
}

// Rows [r0, r0+n) of width f: d <- d * dgelu, and the block's column sums of the result into part.
void gelu_backward_block(const float *dgelu, float *d, int64_t f, int64_t r0, int64_t n, float *part) {
  std::fill(part, part + f, 0.0f);
  for (int64_t i = r0; i < r0 + n; ++i) {
    const float *g = dgelu + i * f;
    float *row = d + i * f;
#pragma omp simd
    for (int64_t j = 0; j < f; ++j) {
      row[j] *= g[j];
      part[j] += row[j];
    }
  }
}

// One (sequence, head) of packed attention; tasks longest first (dynamic scheduling balances better).
struct HeadTask { int64_t start, n, head, probs; };

// false unless offsets [batch + 1] cut rows into sequences; probs_size: heads * sum_b n_b^2.
bool head_tasks(const int32_t *offsets, int64_t batch, int64_t heads, int64_t rows, int64_t *probs_size,
                std::vector<HeadTask> &tasks, int64_t &longest) {
  if (batch < 0 || offsets[0] != 0 || offsets[batch] != rows) return false;
  int64_t at = 0;
  longest = 1;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t start = offsets[b], n = offsets[b + 1] - offsets[b];
    if (n < 0) return false;
    longest = std::max(longest, n);
    for (int64_t a = 0; a < heads; ++a) tasks.push_back({start, n, a, at + a * n * n});
    at += heads * n * n;
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const HeadTask &l, const HeadTask &r) { return l.n > r.n; });
  *probs_size = at;
  return true;
}

// probs block [n, n] = softmax(q k^T / sqrt d); ctx rows of this head = probs @ v.
void head_forward(const HeadTask &t, const float *qkv, int64_t hidden, int64_t d, float *probs, float *ctx) {
  const int64_t ld = 3 * hidden, n = t.n;
  const float *q = qkv + t.start * ld + t.head * d, *k = q + hidden, *v = q + 2 * hidden;
  float *p = probs + t.probs;
  sgemm(false, true, n, n, d, 1.0f / std::sqrt((float)d), q, ld, k, ld, 0.0f, p, n);
  for (int64_t r = 0; r < n; ++r) {
    float *row = p + r * n, mx = row[0], sum = 0.0f;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 1; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      row[j] = fast_exp(row[j] - mx);
      sum += row[j];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  }
  sgemm(false, false, n, d, n, 1.0f, p, n, v, ld, 0.0f, ctx + t.start * hidden + t.head * d, hidden);
}

// dq, dk, dv of one head from dctx: dV = P^T dC, dP = dC V^T, dS = P (dP - rowsum(P dP)),
// dQ = dS K / sqrt d, dK = dS^T Q / sqrt d. ws: n * n floats.
void head_backward(const HeadTask &t, const float *qkv, const float *probs, const float *dctx, int64_t hidden,
                   int64_t d, float *ws, float *dqkv) {
  const int64_t ld = 3 * hidden, n = t.n;
  const float *q = qkv + t.start * ld + t.head * d, *k = q + hidden, *v = q + 2 * hidden, *p = probs + t.probs;
  const float *dc = dctx + t.start * hidden + t.head * d;
  float *dq = dqkv + t.start * ld + t.head * d, *dk = dq + hidden, *dv = dq + 2 * hidden;
  const float scale = 1.0f / std::sqrt((float)d);
  sgemm(true, false, n, d, n, 1.0f, p, n, dc, hidden, 0.0f, dv, ld);
  sgemm(false, true, n, n, d, 1.0f, dc, hidden, v, ld, 0.0f, ws, n);
  for (int64_t r = 0; r < n; ++r) {
    const float *pr = p + r * n;
    float *wr = ws + r * n, dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < n; ++j) dot += pr[j] * wr[j];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) wr[j] = pr[j] * (wr[j] - dot);
  }
  sgemm(false, false, n, d, n, scale, ws, n, k, ld, 0.0f, dq, ld);
  sgemm(true, false, n, d, n, scale, ws, n, q, ld, 0.0f, dk, ld);
}

#if defined(__AVX512F__)
// head_forward with kernels_common.h's register tiles (d % 16 == 0): keys packed in 32-key panels, 32 query rows
// per pass, scores -> softmax -> probabilities stored -> ctx = p @ v. scratch: attention_scratch(d, n, n) floats.
void head_forward_tiled(const HeadTask &t, const float *qkv, int64_t hidden, int64_t d, float *scratch, float *probs,
                        float *ctx) {
  FlushDenormals ftz;
  const int64_t ld = 3 * hidden, n = t.n, npad = round_up(n, 32), lk = key_stride(n);
  const float *q = qkv + t.start * ld + t.head * d, *k = q + hidden, *v = q + 2 * hidden;
  float *kp = scratch, *vp = kp + d * npad, *s = vp + d * npad, *qt = s + kGroupRows * lk, *acc = qt + kGroupRows * d;
  for (int64_t j0 = 0; j0 < npad; j0 += 32)
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = j0; j < j0 + 32; ++j) kp[j0 * d + 32 * c + (j - j0)] = j < n ? k[j * ld + c] : 0.0f;
  for (int64_t j = 0; j < n; ++j) std::memcpy(vp + j * d, v + j * ld, d * sizeof(float));
  const float scale = 1.0f / std::sqrt((float)d);
  float *p = probs + t.probs;
  for (int64_t r0 = 0; r0 < n; r0 += kGroupRows) {
    const int64_t m = std::min(kGroupRows, n - r0), tiles = (m + kTileRows - 1) / kTileRows;
    for (int64_t r = 0; r < tiles * kTileRows; ++r)
      for (int64_t c = 0; c < d; ++c) qt[r * d + c] = r < m ? q[(r0 + r) * ld + c] * scale : 0.0f;
    group_scores(qt, tiles, kp, d, npad, lk, s);
    for (int64_t r = 0; r < m; ++r) {
      float *row = s + r * lk;
      const __m512 inv = _mm512_set1_ps(softmax_row(row, n));
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 mk = lanes_below(n - j);
        _mm512_mask_storeu_ps(row + j, mk, _mm512_mul_ps(inv, _mm512_maskz_loadu_ps(mk, row + j)));
      }
      std::memcpy(p + (r0 + r) * n, row, n * sizeof(float));
    }
    for (int64_t g = 0; g < tiles; ++g) {
      const float *pg = s + g * kTileRows * lk;
      float *a = acc + g * kTileRows * d;
      int64_t c0 = 0;
      for (; c0 + 32 <= d; c0 += 32) tile_context_block<2>(pg, lk, vp + c0, d, 0, n, true, a + c0, d);
      if (c0 < d) tile_context_block<1>(pg, lk, vp + c0, d, 0, n, true, a + c0, d);
    }
    float *o = ctx + (t.start + r0) * hidden + t.head * d;
    for (int64_t r = 0; r < m; ++r) std::memcpy(o + r * hidden, acc + r * d, d * sizeof(float));
  }
}

// out rows j0 .. j0+keys-1 (keys <= 8) of scale * S^T V for S [n, n] (row stride lds) and V [n, W*16 columns]
// (row stride ldv): the 8 x W*16 accumulators in registers over all n rows of S; FULL: keys == 8 (the tail tile
// reads only the keys that exist).
template <int W, bool FULL>
inline void transposed_tile(const float *s, int64_t lds, int64_t n, const float *v, int64_t ldv, int64_t j0,
                            int64_t keys, float scale, float *out, int64_t ldo) {
  __m512 acc[kTileRows][W];
  for (int r = 0; r < kTileRows; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    __m512 vi[W];
    for (int w = 0; w < W; ++w) vi[w] = _mm512_loadu_ps(v + i * ldv + 16 * w);
    const float *si = s + i * lds + j0;
    for (int r = 0; r < kTileRows; ++r) {
      const __m512 b = _mm512_set1_ps(FULL || r < keys ? si[r] : 0.0f);
      for (int w = 0; w < W; ++w) acc[r][w] = _mm512_fmadd_ps(b, vi[w], acc[r][w]);
    }
  }
  const __m512 f = _mm512_set1_ps(scale);
  for (int r = 0; r < (FULL ? kTileRows : keys); ++r)
    for (int w = 0; w < W; ++w) _mm512_storeu_ps(out + (j0 + r) * ldo + 16 * w, _mm512_mul_ps(f, acc[r][w]));
}

// out [n, d] = scale * S^T V (d % 16 == 0) by transposed_tile over tiles of 8 output rows and 32 (or 16) columns:
// the dK and dV of one head (the BLAS product with a transposed [n, n] operand was slow at these small sizes).
void transposed_product(const float *s, int64_t n, const float *v, int64_t ldv, int64_t d, float scale, float *out,
                        int64_t ldo) {
  for (int64_t j0 = 0; j0 < n; j0 += kTileRows) {
    const int64_t keys = std::min(kTileRows, n - j0);
    int64_t c0 = 0;
    if (keys == kTileRows) {
      for (; c0 + 32 <= d; c0 += 32) transposed_tile<2, true>(s, n, n, v + c0, ldv, j0, keys, scale, out + c0, ldo);
      if (c0 < d) transposed_tile<1, true>(s, n, n, v + c0, ldv, j0, keys, scale, out + c0, ldo);
    } else {
      for (; c0 + 32 <= d; c0 += 32) transposed_tile<2, false>(s, n, n, v + c0, ldv, j0, keys, scale, out + c0, ldo);
      if (c0 < d) transposed_tile<1, false>(s, n, n, v + c0, ldv, j0, keys, scale, out + c0, ldo);
    }
  }
}

// head_backward with the same tiles for the two products whose inner size is d or n over 32-row groups:
// dP = dC V^T (V packed in panels like the keys) and dQ = dS K / sqrt d; dK and dV (sums over the query rows)
// through BLAS from the stored dS [n, n] (ws) and P. scratch: attention_scratch(d, n, n) floats.
void head_backward_tiled(const HeadTask &t, const float *qkv, const float *probs, const float *dctx, int64_t hidden,
                         int64_t d, float *scratch, float *ws, float *dqkv) {
  FlushDenormals ftz;
  const int64_t ld = 3 * hidden, n = t.n, npad = round_up(n, 32), lk = key_stride(n);
  const float *q = qkv + t.start * ld + t.head * d, *k = q + hidden, *v = q + 2 * hidden, *p = probs + t.probs;
  const float *dc = dctx + t.start * hidden + t.head * d;
  float *dq = dqkv + t.start * ld + t.head * d, *dk = dq + hidden, *dv = dq + 2 * hidden;
  float *vpan = scratch, *kc = vpan + d * npad, *s = kc + d * npad, *ct = s + kGroupRows * lk, *acc = ct + kGroupRows * d;
  for (int64_t j0 = 0; j0 < npad; j0 += 32)
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = j0; j < j0 + 32; ++j) vpan[j0 * d + 32 * c + (j - j0)] = j < n ? v[j * ld + c] : 0.0f;
  for (int64_t j = 0; j < n; ++j) std::memcpy(kc + j * d, k + j * ld, d * sizeof(float));
  const float scale = 1.0f / std::sqrt((float)d);
  for (int64_t r0 = 0; r0 < n; r0 += kGroupRows) {
    const int64_t m = std::min(kGroupRows, n - r0), tiles = (m + kTileRows - 1) / kTileRows;
    for (int64_t r = 0; r < tiles * kTileRows; ++r)
      for (int64_t c = 0; c < d; ++c) ct[r * d + c] = r < m ? dc[(r0 + r) * hidden + c] : 0.0f;
    group_scores(ct, tiles, vpan, d, npad, lk, s);                 // dP rows (zero rows past m)
    for (int64_t r = 0; r < m; ++r) {
      const float *pr = p + (r0 + r) * n;
      float *row = s + r * lk, dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < n; ++j) dot += pr[j] * row[j];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) row[j] = pr[j] * (row[j] - dot);
      std::memcpy(ws + (r0 + r) * n, row, n * sizeof(float));
    }
    for (int64_t g = 0; g < tiles; ++g) {
      const float *sg = s + g * kTileRows * lk;
      float *a = acc + g * kTileRows * d;
      int64_t c0 = 0;
      for (; c0 + 32 <= d; c0 += 32) tile_context_block<2>(sg, lk, kc + c0, d, 0, n, true, a + c0, d);
      if (c0 < d) tile_context_block<1>(sg, lk, kc + c0, d, 0, n, true, a + c0, d);
    }
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < d; ++c) dq[(r0 + r) * ld + c] = scale * acc[r * d + c];
  }
  transposed_product(ws, n, q, ld, d, scale, dk, ld);
  transposed_product(p, n, dc, hidden, d, 1.0f, dv, ld);
}
#endif  // __AVX512F__

// The register-tiled heads where they apply (AVX-512, d % 16 == 0), unless BGEM3_ATTENTION_BLAS=1; BLAS otherwise.
bool tiled_heads(int64_t d) {
#if defined(__AVX512F__)
  static const bool force_blas = [] {
    const char *e = std::getenv("BGEM3_ATTENTION_BLAS");
    return e && e[0] == '1';
  }();
  return d % 16 == 0 && !force_blas;
#else
  (void)d;
  return false;
#endif
}

void head_forward_any(const HeadTask &t, const float *qkv, int64_t hidden, int64_t d, float *scratch, float *probs,
                      float *ctx) {
#if defined(__AVX512F__)
  if (tiled_heads(d)) return head_forward_tiled(t, qkv, hidden, d, scratch, probs, ctx);
#endif
  (void)scratch;
  head_forward(t, qkv, hidden, d, probs, ctx);
}

void head_backward_any(const HeadTask &t, const float *qkv, const float *probs, const float *dctx, int64_t hidden,
                       int64_t d, float *scratch, float *ws, float *dqkv) {
#if defined(__AVX512F__)
  if (tiled_heads(d)) return head_backward_tiled(t, qkv, probs, dctx, hidden, d, scratch, ws, dqkv);
#endif
  (void)scratch;
  head_backward(t, qkv, probs, dctx, hidden, d, ws, dqkv);
}


// Floats a forward saves for its backward: attention qkv, ctx, probs, xhat, rstd; feed-forward dgelu, act, xhat, rstd.
inline int64_t attention_saved(int64_t rows, int64_t h, int64_t probs) { return rows * (5 * h + 1) + probs; }
inline int64_t ffn_saved(int64_t rows, int64_t h, int64_t f) { return rows * (2 * f + h + 1); }

// What a forward keeps for its backward, held here between the two instead of as extra op outputs (MindSpore's
// autograd fills a zero gradient for every output of a differentiated op: ~150 MB of memset per M3-small layer
// at 5,330 tokens, measured as 13 Zeros ops per step). Each forward call brings a new token (kernels/train.py)
// and puts its buffer under it; the backward reads it by the same token and gives the buffer back to a spare
// list, so later calls reuse its pages (a fresh buffer of this size page-faults in on every call). release_all
// (from Python at the start of each training pass) returns the buffers of forwards whose backward never ran.
class SavedStore {
 public:
  float *put(int64_t token, int64_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    Buffer b;
    auto best = spare_.end();
    for (auto it = spare_.begin(); it != spare_.end(); ++it)
      if (it->size >= n && (best == spare_.end() || it->size < best->size)) best = it;
    if (best != spare_.end()) {
      b = std::move(*best);
      spare_.erase(best);
    } else {
      b.data.reset(new float[n > 0 ? n : 1]);
      b.size = n;
    }
    float *out = b.data.get();
    live_[token] = std::move(b);
    return out;
  }
  const float *get(int64_t token, int64_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(token);
    return it == live_.end() || it->second.size < n ? nullptr : it->second.data.get();
  }
  void release(int64_t token) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(token);
    if (it == live_.end()) return;
    spare_.push_back(std::move(it->second));
    live_.erase(it);
  }
  void release_all() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto &kv : live_) spare_.push_back(std::move(kv.second));
    live_.clear();
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    live_.clear();
    spare_.clear();
  }
  int64_t live() {
    std::lock_guard<std::mutex> lock(mu_);
    return (int64_t)live_.size();
  }

 private:
  struct Buffer {
    std::unique_ptr<float[]> data;
    int64_t size = 0;
  };
  std::mutex mu_;
  std::map<int64_t, Buffer> live_;
  std::vector<Buffer> spare_;
};

SavedStore &saved() {
  static SavedStore store;
  return store;
}

}  // namespace

extern "C" {

void m3t_saved_release_all() { saved().release_all(); }
// Bytes in this library's cache of freed multi-MiB buffers (block_cache.h); release != 0: unmap them first.
int64_t m3t_block_cache(int release) { return block_cache_bytes(release); }
void m3t_saved_clear() { saved().clear(); }
int64_t m3t_saved_live() { return saved().live(); }

#ifdef M3T_PROFILE
int m3t_prof_get(int i, double *t, const char **name) {
  if (i < 0 || i >= prof_count) return 1;
  *t = prof_total[i];
  *name = prof_name[i];
  return 0;
}
void m3t_prof_reset() {
  prof_count = 0;
  std::fill(prof_total, prof_total + 64, 0.0);
}
#endif

// 0 if the BLAS symbols resolved (cpu.build_library checks it through ctypes).
int m3_blas_ready() { return blas().sgemm ? 0 : 1; }

// The token-by-weight products on AMX as bfloat16 triples (gemm_bf16x3.h), switched as m3_bf16x3 does for
// inference; the weight gradients stay on the BLAS.
int m3t_bf16x3(int on, int64_t min_rows) { return bf16x3_switch(on, min_rows); }
// The same for the products on AVX-512 registers (gemm_f32.h); this switch also takes the weight gradients (for
// a weight of at least min_rows rows), as a worker's own products over its slice of the tokens.
int m3t_f32gemm(int on, int64_t min_rows) { return f32gemm_switch(on, min_rows); }
// Its products' worker shares and weight-gradient slices run so far (gemm_f32.h's f32gemm_calls; tests).
int64_t m3t_f32gemm_calls() { return f32gemm_calls.load(); }

// c [m, n] = a^T b for a [k, m], b [k, n] (k tokens) through par_weight_grads, as the backward kernels take a weight
// gradient (for tests).
void m3t_weight_grad(const float *a, const float *b, float *c, int64_t k, int64_t m, int64_t n) {
  float *const outs[1] = {c};
  const WeightGrad grad = {m, n, a, m, b, n, outs, m};
  std::vector<float> part((size_t)omp_get_max_threads() * m * n);
  SingleThreadedBlas one;
#pragma omp parallel
  par_weight_grads(&grad, 1, k, part.data());
}

// The query / key / value projections come fused (w_qkv [3H, H], b_qkv [3H]: parts = 1) or as three
// (w_q, b_q, w_k, b_k, w_v, b_v, each [H, H] and [H]: parts = 3); part j's weight and bias either way.
// wqkv [3H, H] and bqkv [3H] are the fused weight and bias: the inputs themselves (parts = 1) or, after gather()
// (called by every worker of a parallel region; ends with a barrier), copies of the three in the caller's scratch,
// so that the projections are one product with 3H columns (and their backward one with 3H inner size).
struct Projections {
  const float *w[3], *b[3], *wqkv, *bqkv;
  int parts;
  Projections(void **params, int parts_, int64_t h) : parts(parts_) {
    for (int j = 0; j < 3; ++j) {
      w[j] = parts == 1 ? (const float *)params[1] + j * h * h : (const float *)params[1 + 2 * j];
      b[j] = parts == 1 ? (const float *)params[2] + j * h : (const float *)params[2 + 2 * j];
    }
    wqkv = w[0];
    bqkv = b[0];
  }
  void gather(float *wc, float *bc, int64_t h) {
    if (parts == 1) return;
#pragma omp for schedule(static)
    for (int j = 0; j < 3; ++j) {
      std::memcpy(wc + j * h * h, w[j], h * h * sizeof(float));
      if (bc) std::memcpy(bc + j * h, b[j], h * sizeof(float));
    }
#pragma omp single
    {
      wqkv = wc;
      bqkv = bc;
    }
  }
};

// Self-attention sub-layer forward, y = LayerNorm(x + Attention(x W_qkv^T + b_qkv) W_o^T + b_o).
// inputs:  0 x [T, H], then the projections (2 or 6 tensors, see Projections), then w_o [H, H], b_o [H], gamma [H],
//          beta [H], eps [1], offsets [B+1] i32, heads [heads] i32 (only its length is read), token [1] i64
// output:  y [T, H]; saved under the token: qkv [T, 3H], ctx [T, H] (attention output before W_o),
//          probs [heads * sum_b n_b^2], xhat [T, H], rstd [T] (attention_saved)
int m3t_attention_fwd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if ((nparam != 12 && nparam != 16) || !blas().sgemm) return 1;
  const int parts = nparam == 12 ? 1 : 3, at = 2 * parts + 1;
  const int64_t rows = shapes[0][0], h = shapes[0][1], batch = shapes[at + 5][0] - 1;
  const float *x = (const float *)params[0];
  Projections pr(params, parts, h);
  const float *wo = (const float *)params[at], *bo = (const float *)params[at + 1];
  const float *gamma = (const float *)params[at + 2], *beta = (const float *)params[at + 3];
  const float eps = *(const float *)params[at + 4];
  const int32_t *offsets = (const int32_t *)params[at + 5];
  const int64_t heads = shapes[at + 6][0];  // the length of the heads input, not its values
  const int64_t token = *(const int64_t *)params[at + 7];
  float *y = (float *)params[at + 8];
  std::vector<HeadTask> tasks;
  int64_t longest = 1, probs_size;
  if (heads < 1 || h % heads || !head_tasks(offsets, batch, heads, rows, &probs_size, tasks, longest)) return 2;
  float *qkv = saved().put(token, attention_saved(rows, h, probs_size)), *ctx = qkv + rows * 3 * h;
  float *probs = ctx + rows * h, *xhat = probs + probs_size, *rstd = xhat + rows * h;
  const int64_t d = h / heads, ntasks = (int64_t)tasks.size();
  Scratch wcat(parts == 1 ? 0 : 3 * h * h), bcat(parts == 1 ? 0 : 3 * h);
  Products products(rows, {{parts == 1 ? pr.wqkv : wcat.data(), 3 * h, h}, {wo, h, h}});
  SingleThreadedBlas one;
  PROF_START();
#pragma omp parallel
  {
    pr.gather(wcat.data(), bcat.data(), h);
    auto packed = products.start();
    par_chunks(rows, [&](int64_t r0, int64_t n) {                            // bias first, the product added
      for (int64_t i = r0; i < r0 + n; ++i) std::memcpy(qkv + i * 3 * h, pr.bqkv, 3 * h * sizeof(float));
      products.run(0, x + r0 * h, h, n, qkv + r0 * 3 * h, 3 * h, packed.get(), true);
    });
    PROF("af.qkv_gemm")
    Scratch scratch(attention_scratch(d, longest, longest));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < ntasks; ++i) head_forward_any(tasks[i], qkv, h, d, scratch.data(), probs, ctx);
    PROF("af.heads")
    par_chunks(rows, [&](int64_t r0, int64_t n) {
      products.run(1, ctx + r0 * h, h, n, y + r0 * h, h, packed.get());
      for (int64_t i = r0; i < r0 + n; ++i)
        add_layer_norm_save(y + i * h, bo, x + i * h, gamma, beta, h, eps, xhat + i * h, rstd + i);
    });
    PROF("af.out_gemm_ln")
  }
  return 0;
}

// Self-attention sub-layer backward (the forward's saved buffer is read by its token, then given back).
// inputs:  0 dy [T, H], 1 x, then the projections (2 or 6 tensors; the biases are not read), then w_o, gamma,
//          token [1] i64, offsets, heads
// outputs: dx [T, H], the projections' gradients (2 or 6, same shapes), dw_o [H, H], db_o [H], dgamma, dbeta [H],
//          then work space: dctx [T, H], dqkv [T, 3H] (outputs so that they come from MindSpore's memory pool)
int m3t_attention_bwd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if ((nparam != 18 && nparam != 26) || !blas().sgemm) return 1;
  const int parts = nparam == 18 ? 1 : 3, at = 2 * parts + 2;
  const int64_t rows = shapes[0][0], h = shapes[0][1], batch = shapes[at + 3][0] - 1;
  const float *dy = (const float *)params[0], *x = (const float *)params[1];
  Projections pr(params + 1, parts, h);
  const float *wo = (const float *)params[at], *gamma = (const float *)params[at + 1];
  const int64_t token = *(const int64_t *)params[at + 2];
  const int32_t *offsets = (const int32_t *)params[at + 3];
  const int64_t heads = shapes[at + 4][0];
  float *const *out = (float *const *)params + at + 5;
  float *dx = out[0], *dw[3], *db[3];
  for (int j = 0; j < 3; ++j) {
    dw[j] = parts == 1 ? out[1] + j * h * h : out[1 + 2 * j];
    db[j] = parts == 1 ? out[2] + j * h : out[2 + 2 * j];
  }
  float *dwo = out[2 * parts + 1], *dbo = out[2 * parts + 2], *dgamma = out[2 * parts + 3];
  float *dbeta = out[2 * parts + 4], *dctx = out[2 * parts + 5], *dqkv = out[2 * parts + 6];
  std::vector<HeadTask> tasks;
  int64_t longest = 1, probs_size;
  if (heads < 1 || h % heads || !head_tasks(offsets, batch, heads, rows, &probs_size, tasks, longest)) return 2;
  const float *qkv = saved().get(token, attention_saved(rows, h, probs_size));
  if (!qkv) return 3;  // no forward saved under this token (released, or never run)
  const float *ctx = qkv + rows * 3 * h, *probs = ctx + rows * h, *xhat = probs + probs_size;
  const float *rstd = xhat + rows * h;
  const int64_t d = h / heads, ntasks = (int64_t)tasks.size(), blocks = blocks_of(rows);
  Scratch part(std::max<int64_t>(std::max<int64_t>(blocks, 1) * 3 * h, omp_get_max_threads() * 4 * h * h));
  Scratch wcat(parts == 1 ? 0 : 3 * h * h);
  float *const ln_outs[3] = {dgamma, dbeta, dbo}, *const dwo_out[1] = {dwo};
  Products products(rows, {{wo, h, h, false}, {parts == 1 ? pr.wqkv : wcat.data(), h, 3 * h, false}});
  SingleThreadedBlas one;
  PROF_START();
#pragma omp parallel
  {
    auto packed = products.start(0);
    par_chunks(rows, [&](int64_t r0, int64_t n) {                              // dx holds dz from here
      for (int64_t b0 = r0; b0 < r0 + n; b0 += kRows)
        layer_norm_backward_block(dy, xhat, rstd, gamma, h, b0, std::min(kRows, r0 + n - b0), dx,
                                  part.data() + b0 / kRows * 3 * h);
      products.run(0, dx + r0 * h, h, n, dctx + r0 * h, h, packed.get());   // dctx = dz W_o
    });
    reduce_blocks(part.data(), blocks, 3 * h, ln_outs, h);
    PROF("ab.ln_bwd_dctx_gemm")
    Scratch ws(longest * longest), scratch(attention_scratch(d, longest, longest));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < ntasks; ++i) head_backward_any(tasks[i], qkv, probs, dctx, h, d, scratch.data(), ws.data(), dqkv);
    PROF("ab.heads")
    const WeightGrad grads[2] = {{3 * h, h, dqkv, 3 * h, x, h, dw, h}, {h, h, dx, h, ctx, h, dwo_out, h}};
    par_weight_grads(grads, 2, rows, part.data());                             // dx still holds dz
    PROF("ab.dwqkv_dwo_gemm")
    pr.gather(wcat.data(), nullptr, h);
    products.pack(1);
    par_chunks(rows, [&](int64_t r0, int64_t n) {                              // dx = dz + dqkv W_qkv
      for (int64_t b0 = r0; b0 < r0 + n; b0 += kRows)
        colsum_block(dqkv, 3 * h, b0, std::min(kRows, r0 + n - b0), part.data() + b0 / kRows * 3 * h);
      products.run(1, dqkv + r0 * 3 * h, 3 * h, n, dx + r0 * h, h, packed.get(), true);
    });
    reduce_blocks(part.data(), blocks, 3 * h, db, h);
    PROF("ab.dbqkv_dx_gemm")
  }
  saved().release(token);
  return 0;
}

// Feed-forward sub-layer forward, y = LayerNorm(x + GELU(x W1^T + b1) W2^T + b2).
// inputs:  0 x [T, H], 1 w1 [F, H], 2 b1 [F], 3 w2 [H, F], 4 b2 [H], 5 gamma, 6 beta [H], 7 eps [1], 8 token [1] i64
// output:  9 y [T, H]; saved under the token: dgelu [T, F] (GELU' at the GELU input), act [T, F] (the GELU output),
//          xhat [T, H], rstd [T] (ffn_saved)
int m3t_ffn_fwd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 10 || !blas().sgemm) return 1;
  const float *x = (const float *)params[0], *w1 = (const float *)params[1], *b1 = (const float *)params[2];
  const float *w2 = (const float *)params[3], *b2 = (const float *)params[4];
  const float *gamma = (const float *)params[5], *beta = (const float *)params[6];
  const float eps = *(const float *)params[7];
  const int64_t token = *(const int64_t *)params[8], rows = shapes[0][0], h = shapes[0][1], f = shapes[1][0];
  float *y = (float *)params[9], *pre = saved().put(token, ffn_saved(rows, h, f));  // pre: dgelu at the end
  float *act = pre + rows * f, *xhat = act + rows * f, *rstd = xhat + rows * h;
  Products products(rows, {{w1, f, h}, {w2, h, f}});
  SingleThreadedBlas one;
  PROF_START();
#pragma omp parallel
  {
    auto packed = products.start();
    par_chunks(rows, [&](int64_t r0, int64_t n) {
      products.run(0, x + r0 * h, h, n, pre + r0 * f, f, packed.get());
      bias_gelu_rows(pre, b1, act, r0, n, f);
      products.run(1, act + r0 * f, f, n, y + r0 * h, h, packed.get());
      for (int64_t i = r0; i < r0 + n; ++i)
        add_layer_norm_save(y + i * h, b2, x + i * h, gamma, beta, h, eps, xhat + i * h, rstd + i);
    });
    PROF("ff.all")
  }
  return 0;
}

// Feed-forward sub-layer backward (the forward's saved buffer is read by its token, then given back).
// inputs:  0 dy [T, H], 1 x, 2 w1 [F, H], 3 w2 [H, F], 4 gamma, 5 token [1] i64
// outputs: 6 dx [T, H], 7 dw1 [F, H], 8 db1 [F], 9 dw2 [H, F], 10 db2 [H], 11 dgamma, 12 dbeta [H],
//          then work space: 13 dpre [T, F], 14 dz [T, H] (the gradient at the LayerNorm input)
int m3t_ffn_bwd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 15 || !blas().sgemm) return 1;
  const float *dy = (const float *)params[0], *x = (const float *)params[1], *w1 = (const float *)params[2];
  const float *w2 = (const float *)params[3], *gamma = (const float *)params[4];
  const int64_t token = *(const int64_t *)params[5];
  float *dx = (float *)params[6], *dw1 = (float *)params[7], *db1 = (float *)params[8];
  float *dw2 = (float *)params[9], *db2 = (float *)params[10], *dgamma = (float *)params[11];
  float *dbeta = (float *)params[12], *dpre = (float *)params[13], *dz = (float *)params[14];
  const int64_t rows = shapes[0][0], h = shapes[0][1], f = shapes[2][0], blocks = blocks_of(rows);
  const float *dgelu = saved().get(token, ffn_saved(rows, h, f));
  if (!dgelu) return 3;  // no forward saved under this token (released, or never run)
  const float *act = dgelu + rows * f, *xhat = act + rows * f, *rstd = xhat + rows * h;
  Scratch part(std::max(std::max<int64_t>(blocks, 1) * 3 * h, omp_get_max_threads() * 2 * f * h));
  Scratch gpart(std::max<int64_t>(blocks, 1) * f);
  float *const ln_outs[3] = {dgamma, dbeta, db2}, *const bias_out[1] = {db1}, *const dw1_out[1] = {dw1};
  float *const dw2_out[1] = {dw2};
  Products products(rows, {{w2, f, h, false}, {w1, h, f, false}});
  SingleThreadedBlas one;
  PROF_START();
#pragma omp parallel
  {
    auto packed = products.start();
    // Per chunk of rows: dz (LayerNorm backward), d act = dz W2, dpre = d act * GELU', dx = dz + dpre W1.
    par_chunks(rows, [&](int64_t r0, int64_t n) {
      for (int64_t b0 = r0; b0 < r0 + n; b0 += kRows)
        layer_norm_backward_block(dy, xhat, rstd, gamma, h, b0, std::min(kRows, r0 + n - b0), dz,
                                  part.data() + b0 / kRows * 3 * h);
      products.run(0, dz + r0 * h, h, n, dpre + r0 * f, f, packed.get());     // d act = dz W2
      for (int64_t b0 = r0; b0 < r0 + n; b0 += kRows)
        gelu_backward_block(dgelu, dpre, f, b0, std::min(kRows, r0 + n - b0), gpart.data() + b0 / kRows * f);
      std::memcpy(dx + r0 * h, dz + r0 * h, n * h * sizeof(float));
      products.run(1, dpre + r0 * f, f, n, dx + r0 * h, h, packed.get(), true);
    });
    reduce_blocks(part.data(), blocks, 3 * h, ln_outs, h);
    reduce_blocks(gpart.data(), blocks, f, bias_out, f);
    PROF("fb.ln_dact_gelu_dx")
    const WeightGrad grads[2] = {{h, f, dz, h, act, f, dw2_out, h}, {f, h, dpre, f, x, h, dw1_out, f}};
    par_weight_grads(grads, 2, rows, part.data());
    PROF("fb.dw2_dw1_gemm")
  }
  saved().release(token);
  return 0;
}

// y [N, H] = x[idx] row by row, zero rows where idx < 0 (pack / unpack of padded batches).
// inputs: 0 x [R, H], 1 idx [N] i32; output: 2 y [N, H]
int m3t_gather_rows(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 3) return 1;
  const float *x = (const float *)params[0];
  const int32_t *idx = (const int32_t *)params[1];
  float *y = (float *)params[2];
  const int64_t r = shapes[0][0], h = shapes[0][1], n = shapes[1][0];
  for (int64_t i = 0; i < n; ++i)
    if (idx[i] >= r) return 2;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    if (idx[i] >= 0) std::memcpy(y + i * h, x + (int64_t)idx[i] * h, h * sizeof(float));
    else std::fill(y + i * h, y + (i + 1) * h, 0.0f);
  }
  return 0;
}

// The gradient of m3t_gather_rows: dx [R, H] = 0, then dx[idx[i]] = dy[i] (idx injective where >= 0).
// inputs: 0 dy [N, H], 1 idx [N] i32, 2 x [R, H] (shape only); output: 3 dx [R, H]
int m3t_scatter_rows(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4) return 1;
  const float *dy = (const float *)params[0];
  const int32_t *idx = (const int32_t *)params[1];
  float *dx = (float *)params[3];
  const int64_t n = shapes[0][0], h = shapes[0][1], r = shapes[2][0];
  for (int64_t i = 0; i < n; ++i)
    if (idx[i] >= r) return 2;
  std::fill(dx, dx + r * h, 0.0f);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i)
    if (idx[i] >= 0) std::memcpy(dx + (int64_t)idx[i] * h, dy + i * h, h * sizeof(float));
  return 0;
}

// ColBERT head forward (training/batch_scores.ProjectNormalize): z = x W^T + b, y = z / max(||z||, eps) per row.
// inputs: 0 x [T, H], 1 w [D, H], 2 b [D], 3 eps [1], 4 want [1] i32 (for the backward, not read here)
// outputs: 5 y [T, D], 6 norm [T, 1] (||z||)
int m3t_project_fwd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 7 || !blas().sgemm) return 1;
  const float *x = (const float *)params[0], *w = (const float *)params[1], *b = (const float *)params[2];
  const float eps = *(const float *)params[3];
  float *y = (float *)params[5], *norm = (float *)params[6];
  const int64_t rows = shapes[0][0], h = shapes[0][1], d = shapes[1][0];
  if (shapes[1][1] != h || shapes[2][0] != d) return 2;
  SingleThreadedBlas one;
#pragma omp parallel
  par_chunks(rows, [&](int64_t r0, int64_t n) {
    for (int64_t i = r0; i < r0 + n; ++i) std::memcpy(y + i * d, b, d * sizeof(float));
    sgemm(false, true, n, d, h, 1.0f, x + r0 * h, h, w, h, 1.0f, y + r0 * d, d);
    for (int64_t i = r0; i < r0 + n; ++i) {
      float *row = y + i * d, s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < d; ++j) s += row[j] * row[j];
      norm[i] = std::sqrt(s);
      const float den = std::max(norm[i], eps);
      for (int64_t j = 0; j < d; ++j) row[j] /= den;
    }
  });
  return 0;
}

// Its backward: dz = (g - y <g, y>) / max(||z||, eps) (no projection where ||z|| < eps), dw = dz^T x, db = column
// sums of dz, dx = dz W when want[0] != 0 (else zeros: the states are constants).
// inputs:  0 g [T, D], 1 x [T, H], 2 w [D, H], 3 y [T, D], 4 norm [T, 1], 5 eps [1], 6 want [1] i32
// outputs: 7 dx [T, H], 8 dw [D, H], 9 db [D], then work space: 10 dz [T, D]
int m3t_project_bwd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 11 || !blas().sgemm) return 1;
  const float *g = (const float *)params[0], *x = (const float *)params[1], *w = (const float *)params[2];
  const float *y = (const float *)params[3], *norm = (const float *)params[4], eps = *(const float *)params[5];
  const bool want = *(const int32_t *)params[6] != 0;
  float *dx = (float *)params[7], *dw = (float *)params[8], *db = (float *)params[9], *dz = (float *)params[10];
  const int64_t rows = shapes[0][0], d = shapes[0][1], h = shapes[1][1], blocks = blocks_of(rows);
  Scratch part(std::max<int64_t>(blocks, 1) * d), wpart(omp_get_max_threads() * d * h);
  float *const db_out[1] = {db}, *const dw_out[1] = {dw};
  SingleThreadedBlas one;
#pragma omp parallel
  {
    par_chunks(rows, [&](int64_t r0, int64_t n) {
      for (int64_t i = r0; i < r0 + n; ++i) {
        const float *gi = g + i * d, *yi = y + i * d;
        float along = 0.0f;
#pragma omp simd reduction(+ : along)
        for (int64_t j = 0; j < d; ++j) along += gi[j] * yi[j];
        if (!(norm[i] >= eps)) along = 0.0f;
        const float inv = 1.0f / std::max(norm[i], eps);
        float *di = dz + i * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) di[j] = (gi[j] - yi[j] * along) * inv;
      }
      for (int64_t b0 = r0; b0 < r0 + n; b0 += kRows)
        colsum_block(dz, d, b0, std::min(kRows, r0 + n - b0), part.data() + b0 / kRows * d);
      if (want) sgemm(false, false, n, h, d, 1.0f, dz + r0 * d, d, w, h, 0.0f, dx + r0 * h, h);
      else std::fill(dx + r0 * h, dx + (r0 + n) * h, 0.0f);
    });
    reduce_blocks(part.data(), blocks, d, db_out, d);
    const WeightGrad grad = {d, h, dz, d, x, h, dw_out, d};
    par_weight_grads(&grad, 1, rows, wpart.data());
  }
  return 0;
}

// Each passage's span of packed rows [start, start + count): spans [N, 2] i32; false unless inside [0, rows).
bool read_spans(const int32_t *spans, int64_t n, int64_t rows, int64_t *longest) {
  *longest = 1;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t start = spans[2 * j], count = spans[2 * j + 1];
    if (start < 0 || count < 1 || start + count > rows) return false;
    *longest = std::max(*longest, count);
  }
  return true;
}

const int64_t kMaxSimRows = 512;  // passage rows per product of the MaxSim forward (bounds its scratch)

// MaxSim forward (training/batch_scores.MaxSim on spans): best[r, j] = max over the rows k of passage j of
// <q_r, p_k>, at[r, j] = the packed row of that maximum (the first one, as ArgMaxWithValue). Per passage (one
// task each) the products S = p_rows q^T [rows, Tq], then a running maximum down S's rows, vectorised along Tq.
// inputs: 0 q [Tq, D], 1 p [T, D], 2 spans [N, 2] i32 (first row, number of rows of each passage's tokens)
// outputs: 3 best [Tq, N], 4 at [Tq, N] i32
int m3t_maxsim_fwd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 5 || !blas().sgemm) return 1;
  const float *q = (const float *)params[0], *p = (const float *)params[1];
  const int32_t *spans = (const int32_t *)params[2];
  float *best = (float *)params[3];
  int32_t *at = (int32_t *)params[4];
  const int64_t tq = shapes[0][0], d = shapes[0][1], rows = shapes[1][0], n = shapes[2][0];
  int64_t longest;
  if (shapes[1][1] != d || !read_spans(spans, n, rows, &longest)) return 2;
  const int64_t width = std::min(longest, kMaxSimRows);
  SingleThreadedBlas one;
#pragma omp parallel
  {
    Scratch s(width * tq), m(tq);
    std::unique_ptr<int32_t[]> k(new int32_t[tq > 0 ? tq : 1]);
    float *mx = m.data();
    int32_t *arg = k.get();
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t start = spans[2 * j], count = spans[2 * j + 1];
      for (int64_t c0 = 0; c0 < count; c0 += width) {
        const int64_t c = std::min(width, count - c0);
        sgemm(false, true, c, tq, d, 1.0f, p + (start + c0) * d, d, q, d, 0.0f, s.data(), tq);
        int64_t i = 0;
        if (c0 == 0) {
          std::memcpy(mx, s.data(), tq * sizeof(float));
          std::fill(arg, arg + tq, (int32_t)start);
          i = 1;
        }
        for (; i < c; ++i) {
          const float *row = s.data() + i * tq;
          const int32_t r = (int32_t)(start + c0 + i);
#pragma omp simd
          for (int64_t t = 0; t < tq; ++t) {
            const bool more = row[t] > mx[t];
            mx[t] = more ? row[t] : mx[t];
            arg[t] = more ? r : arg[t];
          }
        }
      }
      for (int64_t t = 0; t < tq; ++t) best[t * n + j] = mx[t], at[t * n + j] = arg[t];
    }
  }
  return 0;
}

// Its backward: dq[r] = sum_j dbest[r, j] p[at[r, j]]; dp = 0, then dp[at[r, j]] += dbest[r, j] q[r] (passage by
// passage: their spans are disjoint, so the workers never write one row).
// inputs: 0 dbest [Tq, N], 1 q [Tq, D], 2 p [T, D], 3 at [Tq, N] i32, 4 spans [N, 2] i32; outputs: 5 dq, 6 dp
int m3t_maxsim_bwd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 7) return 1;
  const float *dbest = (const float *)params[0], *q = (const float *)params[1], *p = (const float *)params[2];
  const int32_t *at = (const int32_t *)params[3], *spans = (const int32_t *)params[4];
  float *dq = (float *)params[5], *dp = (float *)params[6];
  const int64_t tq = shapes[0][0], n = shapes[0][1], d = shapes[1][1], rows = shapes[2][0];
  int64_t longest;
  if (!read_spans(spans, n, rows, &longest)) return 2;
  for (int64_t i = 0; i < tq * n; ++i)
    if (at[i] < spans[2 * (i % n)] || at[i] >= spans[2 * (i % n)] + spans[2 * (i % n) + 1]) return 3;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) std::fill(dp + r * d, dp + (r + 1) * d, 0.0f);
#pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < tq; ++r) {
      float *o = dq + r * d;
      std::fill(o, o + d, 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const float a = dbest[r * n + j], *src = p + (int64_t)at[r * n + j] * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) o[k] += a * src[k];
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t r = 0; r < tq; ++r) {
        const float a = dbest[r * n + j], *src = q + r * d;
        float *o = dp + (int64_t)at[r * n + j] * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) o[k] += a * src[k];
      }
  }
  return 0;
}

// One AdamW step over a parameter's n values p -> out, m and v in place (not the aot ABI: called through ctypes on
// NumPy arrays), the arithmetic of training/optim.py's AdamW in the same order, with the gradient first scaled by
// the clipping factor gscale:
//   g' = g * gscale;  m = m * b1 + g' * a1;  v = v * b2 + (g' * g') * a2        (a1 = 1 - b1, a2 = 1 - b2)
//   out = p - ((m / c1) / (sqrt(v / c2) + eps) + p * decay) * lr      (c1 = 1 - b1^t, c2 = 1 - b2^t)
// (1 - b1) and (1 - b2) arrive computed in double, as Python computes them: 1 - float(0.999) is 1.3e-5 off.
void m3t_adamw(const float *p, float *out, const float *g, float *m, float *v, int64_t n, float gscale, float b1,
               float a1, float b2, float a2, float c1, float c2, float eps, float decay, float lr) {
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    const float gs = gscale == 1.0f ? g[i] : g[i] * gscale;
    const float mi = m[i] * b1 + gs * a1, vi = v[i] * b2 + (gs * gs) * a2;
    float update = (mi / c1) / (std::sqrt(vi / c2) + eps);
    if (decay != 0.0f) update = update + p[i] * decay;
    m[i] = mi;
    v[i] = vi;
    out[i] = p[i] - update * lr;
  }
}

// One IEEE half (bit pattern) as a float, exactly: normal, subnormal, zero, infinity and NaN.
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float mag;
  if (exp == 0)
    mag = std::ldexp((float)man, -24);                                // subnormal or zero
  else if (exp == 31)
    mag = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  else
    mag = std::ldexp((float)(man | 0x400u), (int)exp - 25);
  uint32_t bits;
  std::memcpy(&bits, &mag, 4);
  bits |= sign;
  std::memcpy(&mag, &bits, 4);
  return mag;
}

// dst [n] float32 = src [n] IEEE half (bit patterns), exactly (every half is a float): the trainer widens
// its float16 hidden cache once per batch; NumPy's element-wise cast took 5.7 ms for a 40 x 160 x 384 batch.
void m3t_half_to_float(const uint16_t *src, float *dst, int64_t n) {
#pragma omp parallel for schedule(static) if (n > (1 << 18))
  for (int64_t i0 = 0; i0 < n; i0 += 4096) {
    const int64_t end = std::min(n, i0 + 4096);
    int64_t i = i0;
#if defined(__AVX512F__)
    for (; i + 16 <= end; i += 16)
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
#elif defined(__F16C__)
    for (; i + 8 <= end; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < end; ++i) dst[i] = half_to_float(src[i]);
  }
}

}  // extern "C"
