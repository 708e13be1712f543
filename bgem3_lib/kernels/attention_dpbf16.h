// Attention in bfloat16 with AVX512-BF16 dot products (vdpbf16ps), for the int8 path (int8_kernels.cc) on CPUs
// that have AVX512-BF16 but no AMX tiles (AMD Zen 4 / Zen 5, Intel Cooper Lake); AMX CPUs run attention_bf16.h.
//
// The same roundings as the AMX kernel: q / sqrt d, k, v and the softmax's unnormalised weights are rounded to
// bfloat16 (nearest even); every product accumulates in float32; max, exp, sum and 1 / sum stay float32:
//   ctx[i] = sum_j bf16(exp(s[i, j] - m[i])) bf16(v[j]) / sum_j exp(s[i, j] - m[i]),
//   s[i, j] = bf16(q[i] / sqrt d) . bf16(k[j]).
// One vdpbf16ps multiplies 16 pairs by 16 pairs and adds both products into 16 float32 lanes: twice the
// multiply-adds of a float32 FMA, which is what attention at 8192 tokens (57% of the full-size model's FLOPs, which
// the int8 linears do not touch) needs.
//
// The register tiling is attend_tiled's (kernels_common.h), with pairs where that kernel has single values:
//   keys   kb per (sequence, head) [np / 32][d / 2][32 keys][2]: one 64-byte row = 16 keys x one pair of dims;
//   values vb per (sequence, head) [np / 2][d][2]: one 64-byte row = 16 dims x one pair of keys;
//   np = n rounded up to 32, the padding zero (so that padded keys add exactly nothing).
// Worked example (d = 2, one key pair): q = (1, 2), k0 = (3, 4), k1 = (5, 6) -> lanes of scores s0 = 1*3 + 2*4 = 11,
// s1 = 1*5 + 2*6 = 17 from one instruction (the q pair broadcast to every lane, kb holding (3, 4) and (5, 6)).
#ifndef BGEM3_ATTENTION_DPBF16_H_
#define BGEM3_ATTENTION_DPBF16_H_

#include "kernels_common.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define BGEM3_DPBF16 1
#else
#define BGEM3_DPBF16 0
#endif

namespace {

#if BGEM3_DPBF16
// Round to nearest even (vcvtneps2bf16), 16 at a time; the tail of count < 16 is masked.
inline void to_bf16(const float *x, int64_t count, float scale, uint16_t *out) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 m = lanes_below(count - j);
    const __m256bh b = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), s));
    _mm256_mask_storeu_epi16(out + j, m, (__m256i)b);
  }
}

inline uint16_t bf16_scalar(float x) {  // the same rounding, one value (NaN-free input)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline __m512bh pair_at(const uint16_t *p) {  // the bf16 pair p[0], p[1] in every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return (__m512bh)_mm512_set1_epi32(v);
}

inline __m512bh load_bh(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512(p); }

// Keys and values of every (sequence, head) in bfloat16, in a kernel's own layout: sequence b's heads side by side
// from base[b], np x d values each (np = n rounded up to 32, the padding zero). This kernel's and the AMX one's.
struct PackedHeads {
  int64_t hidden, d, heads;
  std::vector<int64_t> base;          // per sequence: offset of its (head 0) packed keys / values
  AlignedVector<uint16_t> kb, vb;

  // The buffers for `batch` sequences (offsets [batch + 1]), zero filled.
  void prepare(const int32_t *offsets, int64_t batch) {
    base.assign(batch + 1, 0);
    for (int64_t b = 0; b < batch; ++b) base[b + 1] = base[b] + round_up(offsets[b + 1] - offsets[b], 32) * hidden;
    kb.assign(base[batch], 0);
    vb.assign(base[batch], 0);
  }

  // Sequence b's length n, head a's keys k and values v in qkv [T, 3H] (row stride 3H), and their packed places.
  struct Head {
    int64_t n;
    const float *k, *v;
    uint16_t *kh, *vh;
  };
  Head head(const float *qkv, const int32_t *offsets, int64_t b, int64_t a) {
    const int64_t n = offsets[b + 1] - offsets[b], at = base[b] + a * round_up(n, 32) * d;
    const float *k = qkv + offsets[b] * 3 * hidden + hidden + a * d;
    return {n, k, k + hidden, kb.data() + at, vb.data() + at};
  }
};

struct DpBf16Attention : PackedHeads {
  // Scratch floats per worker for attend at sequences up to `longest` tokens: scores [32, lk] and context
  // [32, d] as float32; query tile [32, d] and weights [32, np] as bfloat16.
  static int64_t scratch_floats(int64_t d, int64_t longest) {
    const int64_t np = round_up(longest, 32);
    return kGroupRows * key_stride(longest) + kGroupRows * d + (kGroupRows * d + kGroupRows * np) / 2 + 16;
  }

  // Pack k and v of qkv [T, 3H] for every (sequence, head); every thread of a parallel region calls it. A key's
  // row is rounded 16 at a time and its d / 2 pairs stored 32 pairs apart; two keys' values are rounded together
  // (vcvtne2ps2bf16) and interleaved by one permutation per 16 dims.
  void pack(const float *qkv, const int32_t *offsets, int64_t batch) {
    const int64_t ld = 3 * hidden;
    alignas(64) int16_t order[32];
    for (int i = 0; i < 16; ++i) order[2 * i] = (int16_t)i, order[2 * i + 1] = (int16_t)(16 + i);
    const __m512i interleave = _mm512_load_si512(order);
    uint16_t row[256];                    // one key, rounded: d <= 256 (bf16_attention_path)
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t a = 0; a < heads; ++a) {
        const auto [n, k, v, kh, vh] = head(qkv, offsets, b, a);
        for (int64_t j = 0; j < n; ++j) {
          to_bf16(k + j * ld, d, 1.0f, row);
          uint16_t *dst = kh + (j / 32) * 32 * d + (j % 32) * 2;
          for (int64_t c = 0; c < d / 2; ++c) std::memcpy(dst + 64 * c, row + 2 * c, 4);
        }
        for (int64_t j = 0; j < n; j += 2)
          for (int64_t c = 0; c < d; c += 16) {
            const __m512 v0 = _mm512_loadu_ps(v + j * ld + c);
            const __m512 v1 = j + 1 < n ? _mm512_loadu_ps(v + (j + 1) * ld + c) : _mm512_setzero_ps();
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);      // v0's 16 below, v1's above
            _mm512_storeu_si512(vh + (j / 2) * 2 * d + 2 * c, _mm512_permutexvar_epi16(interleave, both));
          }
      }
  }

  // s [8 g, ld] = qt [8 g, d] @ K^T for the tiles g < tiles, 32 keys (one panel of kh) per pass.
  void scores(const uint16_t *qt, int64_t tiles, const uint16_t *kh, int64_t np, int64_t lds, float *s) const {
    for (int64_t j0 = 0; j0 < np; j0 += 32) {
      const uint16_t *panel = kh + j0 * d;
      for (int64_t g = 0; g < tiles; ++g) {
        const uint16_t *q = qt + g * kTileRows * d;
        __m512 acc[kTileRows][2];
        for (int r = 0; r < kTileRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int64_t c = 0; c < d / 2; ++c) {
          const __m512bh k0 = load_bh(panel + 64 * c), k1 = load_bh(panel + 64 * c + 32);
          for (int r = 0; r < kTileRows; ++r) {
            const __m512bh qr = pair_at(q + r * d + 2 * c);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qr, k0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qr, k1);
          }
        }
        float *sg = s + g * kTileRows * lds;
        for (int r = 0; r < kTileRows; ++r) {
          _mm512_storeu_ps(sg + r * lds + j0, acc[r][0]);
          _mm512_storeu_ps(sg + r * lds + j0 + 16, acc[r][1]);
        }
      }
    }
  }

  // acc[r, c0 : c0 + 16 W] (+)= sum over keys j0 <= j < j1 (even) of p[r, j] v[j, c0 : c0 + 16 W] for 8 rows;
  // vc = the value rows at column c0 (vh + 2 c0).
  template <int W>
  void context(const uint16_t *p, int64_t ldp, const uint16_t *vc, int64_t j0, int64_t j1, bool first,
               float *acc_out) const {
    __m512 acc[kTileRows][W];
    for (int r = 0; r < kTileRows; ++r)
      for (int w = 0; w < W; ++w) acc[r][w] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_out + r * d + 16 * w);
    for (int64_t j = j0; j < j1; j += 2) {
      __m512bh vj[W];
      for (int w = 0; w < W; ++w) vj[w] = load_bh(vc + j * d + 32 * w);
      for (int r = 0; r < kTileRows; ++r) {
        const __m512bh pr = pair_at(p + r * ldp + j);
        for (int w = 0; w < W; ++w) acc[r][w] = _mm512_dpbf16_ps(acc[r][w], pr, vj[w]);
      }
    }
    for (int r = 0; r < kTileRows; ++r)
      for (int w = 0; w < W; ++w) _mm512_storeu_ps(acc_out + r * d + 16 * w, acc[r][w]);
  }

  // One task (sequence, head, block of query rows) after pack(); ctx [T, H].
  void attend(const AttentionTask &t, const float *qkv, float *scratch, float *ctx) const {
    FlushDenormals ftz;
    const int64_t ld = 3 * hidden, np = round_up(t.n, 32), lk = key_stride(t.n);
    const uint16_t *kh = kb.data() + base[t.seq] + t.head * np * d, *vh = vb.data() + base[t.seq] + t.head * np * d;
    const float *q = qkv + (t.start + t.row0) * ld + t.head * d;
    float *s = scratch, *acc = s + kGroupRows * lk;
    uint16_t *qt = (uint16_t *)(acc + kGroupRows * d), *p = qt + kGroupRows * d;
    const float scale = 1.0f / std::sqrt((float)d);
    // Key blocks where K and V outgrow L2 (as attend_tiled; here at half the bytes).
    const int64_t kblock = 2 * np * d * (int64_t)sizeof(uint16_t) <= (1 << 20) ? np : kKeyBlock;
    for (int64_t r0 = 0; r0 < t.rows; r0 += kGroupRows) {
      const int64_t m = std::min(kGroupRows, t.rows - r0), tiles = (m + kTileRows - 1) / kTileRows;
      for (int64_t r = 0; r < tiles * kTileRows; ++r) {
        if (r < m)
          to_bf16(q + (r0 + r) * ld, d, scale, qt + r * d);
        else
          std::memset(qt + r * d, 0, d * sizeof(uint16_t));
      }
      scores(qt, tiles, kh, np, lk, s);
      float inv[kGroupRows];
      for (int64_t r = 0; r < tiles * kTileRows; ++r) {
        uint16_t *pr = p + r * np;
        if (r < m) {
          inv[r] = softmax_row(s + r * lk, t.n);
          to_bf16(s + r * lk, t.n, 1.0f, pr);
          std::memset(pr + t.n, 0, (np - t.n) * sizeof(uint16_t));
        } else {
          inv[r] = 0.0f;
          std::memset(pr, 0, np * sizeof(uint16_t));
        }
      }
      for (int64_t j0 = 0; j0 < np; j0 += kblock) {   // V in blocks that stay in L1 over the group
        const int64_t j1 = std::min(np, j0 + kblock);
        for (int64_t g = 0; g < tiles; ++g) {
          const uint16_t *pg = p + g * kTileRows * np;
          float *a = acc + g * kTileRows * d;
          int64_t c0 = 0;
          for (; c0 + 32 <= d; c0 += 32) context<2>(pg, np, vh + 2 * c0, j0, j1, j0 == 0, a + c0);
          if (c0 < d) context<1>(pg, np, vh + 2 * c0, j0, j1, j0 == 0, a + c0);
        }
      }
      store_context(acc, inv, m, d, ctx + (t.start + t.row0 + r0) * hidden + t.head * d, hidden);
    }
  }
};
#endif  // BGEM3_DPBF16

}  // namespace

#endif  // BGEM3_ATTENTION_DPBF16_H_
