// Fused float32 CPU kernels for the M3 encoder's inference path (MindSpore ops.Custom, func_type="aot").
//
// Every kernel works on *packed* tokens: the non-padding tokens of a batch laid end to end,
// x [T, H], with sequence b occupying rows offsets[b] .. offsets[b+1]-1. Attention runs per
// sequence on exactly its own tokens, so no FLOP is spent on padding and no mask is needed.
//
// Matrix products go to the BLAS already shipped with NumPy (OpenBLAS), opened with dlopen; the
// library path, symbol names and integer width are fixed at compile time by cpu_kernels.py:
//   BGEM3_BLAS_LIB, BGEM3_SGEMM, BGEM3_SET_THREADS, BGEM3_GET_THREADS, BGEM3_BLAS_INT.
// Element-wise work (bias, GELU, softmax, layer norm) is fused into one pass per row, with OpenMP.
//
// Kernel ABI (MindSpore aot): int f(int nparam, void **params, int *ndims, int64_t **shapes,
//                                   const char **dtypes, void *stream, void *extra); inputs then output.
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

int64_t numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}

}  // namespace

extern "C" {

// 0 if the BLAS symbols resolved (called from Python through ctypes before any op is built).
int m3_blas_ready() { return blas().sgemm ? 0 : 1; }

// y [T, N] = x [T, K] @ w[N, K]^T + b.
int m3_linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4 || !blas().sgemm) return 1;
  const float *x = (const float *)params[0], *w = (const float *)params[1], *b = (const float *)params[2];
  float *y = (float *)params[3];
  int64_t k = shapes[0][ndims[0] - 1], rows = numel(ndims[0], shapes[0]) / k, n = shapes[1][0];
  int64_t block = row_block(rows);
  SingleThreadedBlas one;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t r0 = 0; r0 < rows; r0 += block) linear_rows(x, w, b, y, r0, std::min(block, rows - r0), k, n, false);
  return 0;
}

// Embeddings: y [T, H] = LayerNorm(word[ids] + position[pos] + token_type0).
// inputs: ids [T] i32, pos [T] i32, word [V, H], position [P, H], token_type0 [H], gamma, beta, eps [1].
int m3_embed(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 9) return 1;
  const int32_t *ids = (const int32_t *)params[0], *pos = (const int32_t *)params[1];
  const float *word = (const float *)params[2], *position = (const float *)params[3];
  const float *tt = (const float *)params[4], *gamma = (const float *)params[5], *beta = (const float *)params[6];
  float eps = *(const float *)params[7], *y = (float *)params[8];
  int64_t rows = shapes[0][0], h = shapes[2][1], vocab = shapes[2][0], npos = shapes[3][0];
  for (int64_t i = 0; i < rows; ++i)
    if (ids[i] < 0 || ids[i] >= vocab || pos[i] < 0 || pos[i] >= npos) return 2;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    float *r = y + i * h;
    const float *we = word + (int64_t)ids[i] * h, *pe = position + (int64_t)pos[i] * h;
    for (int64_t j = 0; j < h; ++j) r[j] = we[j] + pe[j];
    add_layer_norm(r, tt, nullptr, gamma, beta, h, eps);
  }
  return 0;
}

// Self-attention sub-layer: y = LayerNorm(x + Attention(x) @ Wo^T + bo).
// inputs: x [T, H], w_qkv [3H, H], b_qkv [3H], w_o [H, H], b_o [H], gamma, beta, eps [1],
//         offsets [B+1] i32, heads [1] i32.
int m3_attention_block(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 11 || !blas().sgemm) return 1;
  const float *x = (const float *)params[0], *wqkv = (const float *)params[1], *bqkv = (const float *)params[2];
  const float *wo = (const float *)params[3], *bo = (const float *)params[4];
  const float *gamma = (const float *)params[5], *beta = (const float *)params[6];
  float eps = *(const float *)params[7];
  const int32_t *offsets = (const int32_t *)params[8];
  int64_t heads = *(const int32_t *)params[9];
  float *y = (float *)params[10];
  int64_t rows = shapes[0][0], h = shapes[0][1], batch = shapes[8][0] - 1, d = h / heads, qblock = 256;
  if (heads < 1 || h % heads || offsets[0] != 0 || offsets[batch] != rows) return 2;
  std::vector<AttentionTask> tasks;
  int64_t longest = 1;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t start = offsets[b], n = offsets[b + 1] - offsets[b];
    if (n < 0) return 2;
    longest = std::max(longest, n);
    for (int64_t a = 0; a < heads; ++a)
      for (int64_t r = 0; r < n; r += qblock) tasks.push_back({start, n, a, r, std::min(qblock, n - r)});
  }
  std::vector<float> qkv(rows * 3 * h), ctx(rows * h);
  const int64_t block = row_block(rows), ntasks = (int64_t)tasks.size();
  SingleThreadedBlas one;
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t r0 = 0; r0 < rows; r0 += block)
      linear_rows(x, wqkv, bqkv, qkv.data(), r0, std::min(block, rows - r0), h, 3 * h, false);
    std::vector<float> scores(std::min(qblock, longest) * longest);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < ntasks; ++i) attend(tasks[i], qkv.data(), h, d, scores.data(), ctx.data());
#pragma omp for schedule(dynamic, 1)
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      int64_t n = std::min(block, rows - r0);
      gemm(true, n, h, h, 1.0f, ctx.data() + r0 * h, h, wo, h, 0.0f, y + r0 * h, h);
      for (int64_t i = r0; i < r0 + n; ++i) add_layer_norm(y + i * h, bo, x + i * h, gamma, beta, h, eps);
    }
  }
  return 0;
}

// Feed-forward sub-layer: y = LayerNorm(x + GELU(x @ W1^T + b1) @ W2^T + b2). Each worker takes a
// block of rows through both products, so the [block, F] intermediate stays in its cache.
// inputs: x [T, H], w1 [F, H], b1 [F], w2 [H, F], b2 [H], gamma, beta, eps [1].
int m3_ffn_block(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 9 || !blas().sgemm) return 1;
  const float *x = (const float *)params[0], *w1 = (const float *)params[1], *b1 = (const float *)params[2];
  const float *w2 = (const float *)params[3], *b2 = (const float *)params[4];
  const float *gamma = (const float *)params[5], *beta = (const float *)params[6];
  float eps = *(const float *)params[7], *y = (float *)params[8];
  int64_t rows = shapes[0][0], h = shapes[0][1], f = shapes[1][0], block = row_block(rows);
  SingleThreadedBlas one;
#pragma omp parallel
  {
    std::vector<float> inner(block * f);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      int64_t n = std::min(block, rows - r0);
      linear_rows(x + r0 * h, w1, b1, inner.data(), 0, n, h, f, true);
      gemm(true, n, h, f, 1.0f, inner.data(), f, w2, f, 0.0f, y + r0 * h, h);
      for (int64_t i = r0; i < r0 + n; ++i) add_layer_norm(y + i * h, b2, x + i * h, gamma, beta, h, eps);
    }
  }
  return 0;
}

}  // extern "C"
