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
#include <cstring>
#include <vector>

namespace {

typedef BGEM3_BLAS_INT blas_int;
typedef void (*sgemm_fn)(int, int, int, blas_int, blas_int, blas_int, float, const float *, blas_int,
                         const float *, blas_int, float, float *, blas_int);
typedef void (*set_threads_fn)(blas_int);
typedef blas_int (*get_threads_fn)(void);

const int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

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
inline float gelu_erf(float x) {
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
  return x >= 0.0f ? x * (1.0f - half_erfc) : x * half_erfc;
}

// row <- LayerNorm(row + bias + residual) * gamma + beta  (biased variance, eps inside the sqrt).
inline void add_layer_norm(float *row, const float *bias, const float *res, const float *gamma,
                           const float *beta, int64_t h, float eps) {
  if (res) {
    for (int64_t j = 0; j < h; ++j) row[j] += bias[j] + res[j];
  } else {
    for (int64_t j = 0; j < h; ++j) row[j] += bias[j];
  }
  float sum = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < h; ++j) sum += row[j];
  const float mean = sum / (float)h;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < h; ++j) sq += (row[j] - mean) * (row[j] - mean);
  const float inv = 1.0f / std::sqrt(sq / (float)h + eps);
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
    for (int64_t j = 0; j < n; ++j) r[j] = gelu_erf(r[j] + bias[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) r[j] += bias[j];
  }
}

// y[r0:r0+n] = x[r0:r0+n] @ w^T + b (GELU optional): one worker's share of a linear layer.
void linear_rows(const float *x, const float *w, const float *b, float *y, int64_t r0, int64_t n, int64_t k,
                 int64_t out, bool gelu) {
  gemm(true, n, out, k, 1.0f, x + r0 * k, k, w, k, 0.0f, y + r0 * out, out);
  for (int64_t i = r0; i < r0 + n; ++i) add_bias(y + i * out, b, out, gelu);
}

// Scaled dot-product attention of one (sequence, head, block of query rows) on the sequence's own
// tokens. qkv [T, 3H] (query | key | value, heads side by side), ctx [T, H], scores [rows, n] scratch.
// (A hand-written AVX2 6x16 tile kernel for these skinny products was tried and measured at about
// half of OpenBLAS's single-thread speed on them, so BLAS it is.)
struct AttentionTask { int64_t start, n, head, row0, rows; };

void attend(const AttentionTask &t, const float *qkv, int64_t hidden, int64_t d, float *scores, float *ctx) {
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
      for (int64_t r = 0; r < n; r += qblock) tasks.push_back({start, n, a, r, std::min(qblock, n - r)});
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
