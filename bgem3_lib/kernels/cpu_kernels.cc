// Fused float32 CPU kernels for the M3 encoder's inference path (MindSpore ops.Custom, func_type="aot").
//
// Every kernel works on *packed* tokens: the non-padding tokens of a batch laid end to end,
// x [T, H], with sequence b occupying rows offsets[b] .. offsets[b+1]-1. Attention runs per
// sequence on exactly its own tokens, so no FLOP is spent on padding and no mask is needed.
//
// The linear layers' products run on AMX tiles as bfloat16 triples where the CPU has AMX-BF16 (gemm_bf16x3.h:
// float32 accuracy), else on AVX-512 registers (gemm_f32.h) where the CPU has AVX-512, else (and for calls of few
// rows) on the BLAS already shipped with NumPy (OpenBLAS), opened with dlopen
// (attention: on AMX as bfloat16 triples where the head size is a multiple of 32, attention_bf16x3.h; else
// kernels_common.h's tile kernel, or OpenBLAS where it does not apply); the
// library path, symbol names and integer width are fixed at compile time by cpu_kernels.py:
//   BGEM3_BLAS_LIB, BGEM3_SGEMM, BGEM3_SET_THREADS, BGEM3_GET_THREADS, BGEM3_BLAS_INT.
// Element-wise work (bias, GELU, softmax, layer norm) is fused into one pass per row, with OpenMP.
//
// Kernel ABI (MindSpore aot): int f(int nparam, void **params, int *ndims, int64_t **shapes,
//                                   const char **dtypes, void *stream, void *extra); inputs then output.
//
// The helpers (BLAS handle, GELU, layer norm, attention) live in kernels_common.h, shared with int8_kernels.cc.
#include "kernels_common.h"
#include "gemm_bf16x3.h"
#include "attention_bf16x3.h"

extern "C" {

// 0 if the BLAS symbols resolved (called from Python through ctypes before any op is built).
int m3_blas_ready() { return blas().sgemm ? 0 : 1; }

// The linear layers' products on AMX as bfloat16 triples (gemm_bf16x3.h) on (1) or off (0: the BLAS), or only
// ask (-1), for calls of at least min_rows rows (>= 1; else unchanged); returns 1 if they run there (compiled in,
// granted, switched on).
int m3_bf16x3(int on, int64_t min_rows) { return bf16x3_switch(on, min_rows); }

// Attention on AMX as bfloat16 triples (attention_bf16x3.h) on (1), off (0: attend()) or only ask (-1), for calls
// of at least min_rows rows (>= 1; else unchanged); returns 1 if such calls run there.
int m3_bf16x3_attention(int on, int64_t min_rows) { return x3_attention_path.set(on, min_rows, x3_attention_on); }

// The same for the products on AVX-512 registers (gemm_f32.h; where AMX does not take them).
int m3_f32gemm(int on, int64_t min_rows) { return f32gemm_switch(on, min_rows); }
// Its switch's state: 0 off (or no AVX-512 build), 1 on, 2 on for weights packed ahead only (kPackedOnly).
int m3_f32gemm_wanted() { return f32gemm_on(1 << 30, true) ? f32gemm_path.wanted.load() : 0; }
// Products' worker shares it has run so far (gemm_f32.h's f32gemm_calls; tests).
int64_t m3_f32gemm_calls() { return f32gemm_calls.load(); }
// Its k extent taken in one block (gemm_f32.h's f32_whole_k) set when k >= 0; returns the value now in force.
int64_t m3_f32gemm_whole_k(int64_t k) {
  if (k >= 0) f32_whole_k_v.store(k);
  return f32_whole_k();
}
// Bytes in block_cache.h's cache of freed multi-MiB buffers; release != 0: unmap them first (returns what it held).
int64_t m3_block_cache(int release) { return block_cache_bytes(release); }

}  // extern "C"

namespace {
// y [m, n] = (or +=, accumulate) x [m, k] @ w^T (+ b) for w [n, k], or x @ w (+ b) for w [k, n] (kn); b may be null.
void linear_product(const float *x, const float *w, const float *b, float *y, int64_t m, int64_t n, int64_t k,
                    bool kn, bool accumulate) {
  Products products(m, {{w, n, k, !kn}});
  const int64_t block = row_block(m);
  SingleThreadedBlas one;
#pragma omp parallel
  {
    auto scratch = products.start();
#pragma omp for schedule(dynamic, 1)
    for (int64_t r0 = 0; r0 < m; r0 += block) {
      const int64_t rows = std::min(block, m - r0);
      products.run(0, x + r0 * k, k, rows, y + r0 * n, n, scratch.get(), accumulate);
      if (b)
        for (int64_t i = r0; i < r0 + rows; ++i) add_bias(y + i * n, b, n, false);
    }
  }
}
}  // namespace

extern "C" {

// y [m, n] = (or +=, accumulate) x [m, k] @ w^T for w [n, k], or x @ w for w [k, n] (kn), on the current path
// (tests: compared with float64 and with the BLAS).
void m3_product(const float *x, const float *w, float *y, int64_t m, int64_t n, int64_t k, int kn, int accumulate) {
  linear_product(x, w, nullptr, y, m, n, k, kn != 0, accumulate != 0);
}

// y [T, N] = x [T, K] @ w[N, K]^T + b.
int m3_linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 4 || !blas().sgemm) return 1;
  const float *x = (const float *)params[0], *w = (const float *)params[1], *b = (const float *)params[2];
  const int64_t k = shapes[0][ndims[0] - 1], rows = numel(ndims[0], shapes[0]) / k, n = shapes[1][0];
  linear_product(x, w, b, (float *)params[3], rows, n, k, false, false);
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
// inputs: x [T, H], w_q [H, H], b_q [H], w_k, b_k, w_v, b_v (the same shapes), w_o [H, H], b_o [H], gamma, beta,
//         eps [1], offsets [B+1] i32, heads [1] i32[, packed-weights id [1] i64 (m3_f32_pack)].
// The three projections are written side by side into one qkv [T, 3H] (query | key | value), the layout
// attend() reads; the weights stay three arrays, so they can be the checkpoint's file-mapped tensors.
int m3_attention_block(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if ((nparam != 15 && nparam != 16) || !blas().sgemm) return 1;
  const float *x = (const float *)params[0];
  const float *w3[3] = {(const float *)params[1], (const float *)params[3], (const float *)params[5]};
  const float *b3[3] = {(const float *)params[2], (const float *)params[4], (const float *)params[6]};
  const float *wo = (const float *)params[7], *bo = (const float *)params[8];
  const float *gamma = (const float *)params[9], *beta = (const float *)params[10];
  float eps = *(const float *)params[11];
  const int32_t *offsets = (const int32_t *)params[12];
  int64_t heads = *(const int32_t *)params[13];
  float *y = (float *)params[nparam - 1];
  const auto ahead = packed_set(nparam == 16 ? *(const int64_t *)params[14] : 0);
  int64_t rows = shapes[0][0], h = shapes[0][1], batch = shapes[12][0] - 1, qblock = 256;
  if (heads < 1 || h % heads) return 2;
  const int64_t d = h / heads;  // after the check: heads < 1 must not reach the division
  const bool x3 = d % 32 == 0 && x3_attention_on(rows);
  int64_t longest = 1;
  for (int64_t b = 0; b < batch; ++b) longest = std::max<int64_t>(longest, offsets[b + 1] - offsets[b]);
  if (x3) qblock = x3_query_block(batch, heads, longest, omp_get_max_threads());
  std::vector<AttentionTask> tasks;
  if (!attention_tasks(offsets, batch, heads, rows, qblock, tasks, longest)) return 2;
  Scratch qkv(rows * 3 * h), ctx(rows * h);
  const int64_t block = row_block(rows), ntasks = (int64_t)tasks.size();
  const PackedSet *set = ahead.get();
  Products products(rows, {weight_ahead(set, w3[0], h, h), weight_ahead(set, w3[1], h, h),
                           weight_ahead(set, w3[2], h, h), weight_ahead(set, wo, h, h)});
  SingleThreadedBlas one;
#pragma omp parallel
  {
    auto packed = products.start();
#pragma omp for schedule(dynamic, 1)
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      const int64_t n = std::min(block, rows - r0);
      for (int j = 0; j < 3; ++j) {
        float *out = qkv.data() + r0 * 3 * h + j * h;
        products.run(j, x + r0 * h, h, n, out, 3 * h, packed.get());
        for (int64_t i = 0; i < n; ++i) add_bias(out + i * 3 * h, b3[j], h, false);
      }
    }
    if (x3) {
      auto scratch = aligned_array<uint16_t>(bf16x3_attention_scratch(d, longest));
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < ntasks; ++i) attend_bf16x3(tasks[i], qkv.data(), h, d, scratch.get(), ctx.data());
    } else {
      Scratch scores(attention_scratch(d, longest, qblock));
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < ntasks; ++i) attend(tasks[i], qkv.data(), h, d, scores.data(), ctx.data());
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      int64_t n = std::min(block, rows - r0);
      products.run(3, ctx.data() + r0 * h, h, n, y + r0 * h, h, packed.get());
      for (int64_t i = r0; i < r0 + n; ++i) add_layer_norm(y + i * h, bo, x + i * h, gamma, beta, h, eps);
    }
  }
  return 0;
}

// Feed-forward sub-layer: y = LayerNorm(x + GELU(x @ W1^T + b1) @ W2^T + b2). Each worker takes a
// block of rows through both products, so the [block, F] intermediate stays in its cache.
// inputs: x [T, H], w1 [F, H], b1 [F], w2 [H, F], b2 [H], gamma, beta, eps [1][, packed-weights id [1] i64].
int m3_ffn_block(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  if ((nparam != 9 && nparam != 10) || !blas().sgemm) return 1;
  const float *x = (const float *)params[0], *w1 = (const float *)params[1], *b1 = (const float *)params[2];
  const float *w2 = (const float *)params[3], *b2 = (const float *)params[4];
  const float *gamma = (const float *)params[5], *beta = (const float *)params[6];
  float eps = *(const float *)params[7], *y = (float *)params[nparam - 1];
  const auto ahead = packed_set(nparam == 10 ? *(const int64_t *)params[8] : 0);
  int64_t rows = shapes[0][0], h = shapes[0][1], f = shapes[1][0], block = row_block(rows);
  Products products(rows, {weight_ahead(ahead.get(), w1, f, h), weight_ahead(ahead.get(), w2, h, f)});
  SingleThreadedBlas one;
#pragma omp parallel
  {
    auto packed = products.start();
    Scratch inner(block * f);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      int64_t n = std::min(block, rows - r0);
      products.run(0, x + r0 * h, h, n, inner.data(), f, packed.get());
      for (int64_t i = 0; i < n; ++i) add_bias(inner.data() + i * f, b1, f, true);
      products.run(1, inner.data(), f, n, y + r0 * h, h, packed.get());
      for (int64_t i = r0; i < r0 + n; ++i) add_layer_norm(y + i * h, b2, x + i * h, gamma, beta, h, eps);
    }
  }
  return 0;
}


// Pack the float32 weights W_j [n_j, k_j] given as inputs (y = x @ W_j^T) once, for AMX's bfloat16 triples where
// those take the products, else for gemm_f32.h, and keep them (packed_weights.h, gemm_bf16x3.h's
// pack_weights_ahead); output: the set's id [1] i64 (0: nothing to pack for in this build). The fused blocks take
// the id as an extra input.
int m3_f32_pack(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam < 2) return 1;
  std::vector<const float *> w;
  std::vector<int64_t> n, k;
  for (int j = 0; j + 1 < nparam; ++j) {
    if (ndims[j] != 2 || shapes[j][0] < 1 || shapes[j][1] < 1) return 2;
    w.push_back((const float *)params[j]);
    n.push_back(shapes[j][0]);
    k.push_back(shapes[j][1]);
  }
  *(int64_t *)params[nparam - 1] = pack_weights_ahead(w.data(), n.data(), k.data(), nparam - 1);
  return 0;
}

// Forget packed set `id`; 1 if it was kept. The number of sets kept (tests).
int m3_f32_release(int64_t id) { return release_weights(id); }
int64_t m3_f32_packed_sets() { return packed_sets(); }

}  // extern "C"
