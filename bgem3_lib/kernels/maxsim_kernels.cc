// Late-interaction (ColBERT) scores of each query against its own candidate documents, fused:
//   s[i, k] = 1/n_i * sum_a max_b <q_a, d_b>,   q = query i's vectors [n_i, H], d = document cand[i, k]'s [m, H]
// (kernels/maxsim.py calls it; retrieval/index.py's colbert_rerank is the NumPy form of the same sum).
//
// Why fused: the NumPy form multiplies a block of queries against every document its block needs and then takes
// segment maxima of a [query tokens, document tokens] matrix in memory. On small corpora, where the candidate
// lists of neighbouring queries cover most documents, that computes several times the products a query's own
// candidates need, and the token-score matrix makes a round trip through memory. Here each query meets only its
// candidates and the maxima are taken in registers.
//
// Layout in registers: the query's tokens are the lanes. Up to 32 query tokens at a time are transposed into
// qt [H, 16 V] (V = 1 or 2 vectors of 16 lanes, zero beyond n); then B = 12 document tokens at a time:
//   acc[b][v] = sum_c d[b, c] * qt[c, 16 v : 16 v + 16]     (a broadcast of d, an FMA per vector)
// and a running max over the document's tokens, lane by lane. One horizontal sum per (query chunk, document)
// adds the lanes (masked to the chunk's tokens). Document rows are read where they are (one pointer per
// document): nothing is packed or copied. H must be a multiple of 16; without AVX-512 the library reports 0
// from m3_maxsim_vectorized and Python keeps the NumPy form.
#include "kernels_common.h"

namespace {

#if defined(__AVX512F__)
const int64_t kDocRows = 12;

// mx[v] <- max(mx[v], max over rows b < B of d[b] . qt) for B document rows at d (row stride H).
template <int V, int B>
inline void max_rows(const float *d, const float *qt, int64_t h, __m512 *mx) {
  __m512 acc[B][V];
  for (int b = 0; b < B; ++b)
    for (int v = 0; v < V; ++v) acc[b][v] = _mm512_setzero_ps();
  for (int64_t c = 0; c < h; ++c) {
    __m512 q[V];
    for (int v = 0; v < V; ++v) q[v] = _mm512_load_ps(qt + (c * V + v) * 16);
    for (int b = 0; b < B; ++b) {
      const __m512 x = _mm512_set1_ps(d[b * h + c]);
      for (int v = 0; v < V; ++v) acc[b][v] = _mm512_fmadd_ps(x, q[v], acc[b][v]);
    }
  }
  for (int b = 0; b < B; ++b)
    for (int v = 0; v < V; ++v) mx[v] = _mm512_max_ps(mx[v], acc[b][v]);
}

// sum over the chunk's lanes (lanes < tokens) of max over the document's m rows of d . qt.
template <int V>
inline float chunk_maxsim(const float *d, int64_t m, const float *qt, int64_t h, int64_t tokens) {
  __m512 mx[V];
  for (int v = 0; v < V; ++v) mx[v] = _mm512_set1_ps(-INFINITY);
  int64_t b = 0;
  for (; b + kDocRows <= m; b += kDocRows) max_rows<V, kDocRows>(d + b * h, qt, h, mx);
  for (; b + 4 <= m; b += 4) max_rows<V, 4>(d + b * h, qt, h, mx);
  for (; b < m; ++b) max_rows<V, 1>(d + b * h, qt, h, mx);
  float sum = 0.0f;
  for (int v = 0; v < V; ++v) {
    const int64_t lanes = std::min<int64_t>(16, tokens - 16 * v);
    if (lanes > 0)
      sum += _mm512_mask_reduce_add_ps((__mmask16)(lanes >= 16 ? 0xFFFF : (1u << lanes) - 1u), mx[v]);
  }
  return sum;
}
#endif

}  // namespace

extern "C" {

int m3_blas_ready() { return blas().sgemm ? 0 : 1; }

// 1 when m3_maxsim runs (built with AVX-512), else 0.
int m3_maxsim_vectorized() {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

// q: every query's vectors stacked [q_off[nq], h] (query i in rows q_off[i]:q_off[i + 1], at least one);
// docs[j]: document j's vectors [d_len[j], h] (row-major, may be null for a document no candidate names);
// cand [nq, k]: document ids, -1 = none; out [nq, k]: the scores, -inf where cand is -1.
// Returns 0; 1 without AVX-512; 2 when h is not a multiple of 16, an id is out of [-1, n_docs) or names an empty
// or missing document, or a query has no vectors (nothing is written then).
int m3_maxsim(const float *q, const int64_t *q_off, int64_t nq, const float *const *docs, const int64_t *d_len,
              int64_t n_docs, const int64_t *cand, int64_t k, int64_t h, float *out) {
#if defined(__AVX512F__)
  if (h <= 0 || h % 16 != 0 || nq < 0 || k < 0) return 2;
  for (int64_t i = 0; i < nq; ++i)
    if (q_off[i + 1] <= q_off[i]) return 2;
  for (int64_t t = 0; t < nq * k; ++t)
    if (cand[t] < -1 || cand[t] >= n_docs || (cand[t] >= 0 && (d_len[cand[t]] < 1 || !docs[cand[t]]))) return 2;
#pragma omp parallel
  {
    AlignedVector<float> qt(h * 32);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t n = q_off[i + 1] - q_off[i];
      float *row = out + i * k;
      for (int64_t t = 0; t < k; ++t) row[t] = cand[i * k + t] >= 0 ? 0.0f : -INFINITY;
      for (int64_t a0 = 0; a0 < n; a0 += 32) {
        const int64_t tokens = std::min<int64_t>(32, n - a0), width = tokens > 16 ? 32 : 16;
        const float *qa = q + (q_off[i] + a0) * h;
        for (int64_t c = 0; c < h; ++c)             // qt[c, a] = q[a0 + a, c], zero past the chunk's tokens
          for (int64_t a = 0; a < width; ++a) qt[c * width + a] = a < tokens ? qa[a * h + c] : 0.0f;
        for (int64_t t = 0; t < k; ++t) {
          const int64_t j = cand[i * k + t];
          if (j < 0) continue;
          row[t] += width == 32 ? chunk_maxsim<2>(docs[j], d_len[j], qt.data(), h, tokens)
                                : chunk_maxsim<1>(docs[j], d_len[j], qt.data(), h, tokens);
        }
      }
      for (int64_t t = 0; t < k; ++t)
        if (cand[i * k + t] >= 0) row[t] /= (float)n;
    }
  }
  return 0;
#else
  (void)q, (void)q_off, (void)nq, (void)docs, (void)d_len, (void)n_docs, (void)cand, (void)k, (void)h, (void)out;
  return 1;
#endif
}

}  // extern "C"
