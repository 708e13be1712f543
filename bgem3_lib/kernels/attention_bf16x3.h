// Float32 attention on AMX tiles, every operand as a bfloat16 triple, for the float32 path (cpu_kernels.cc) on
// CPUs with AMX-BF16; elsewhere, or with the switch off, kernels_common.h's attend() computes it.
//
// For each (sequence, head, block of query rows): s = (q / sqrt d) @ k^T and ctx = softmax(s) @ v to float32
// accuracy. q, k, v and the softmax weights are split exactly into three bfloat16 parts (bf16x3_split.h), and each
// product sums the six part products that matter, as gemm_bf16x3.h does (the three left out add up to less than
// 2^-21 of the product). The softmax is computed online over blocks of kX3Keys keys (flash attention): per query
// row a running max m and sum l; a new block with max m' scales the row's context and sum by exp(m - m'). So the
// scores and weights of one block (64 x 128) stay in L1/L2 whatever the sequence length, where the two-pass
// kernels hold the scores of 32 query rows against all n keys (1 MiB at n = 8192). Query groups of 128 or 256
// rows (fewer passes over K and V) and key blocks of 64 measured within noise of these (one M3-small layer,
// 8192 tokens, 2 cores).
//
// Worked example (d = 1, one query row, keys in two blocks): s = (0, 2 | 1). Block 1: m = 2, l = e^-2 + 1,
// acc = e^-2 v0 + v1. Block 2: m' = 2 (no change, factor 1), l += e^-1, acc += e^-1 v2; ctx = acc / l, which is
// softmax(s) @ v.
//
// Layouts (bf16 as uint16_t, one tile = 16 rows x 32 = 512 values; np = n rounded up to 64, the padding zero):
//   keys   [np / 16][d / 32][3 parts][16 dim pairs][16 keys][2]: B tiles of s, one per (16 keys, 32 dims);
//   values [np / 32][d / 16][3 parts][16 key pairs][16 dims][2]: B tiles of ctx, one per (32 keys, 16 dims);
//   q      [4 row tiles][d / 32][3 parts][16 rows][32 dims]: A tiles of s (64 query rows, scaled by 1 / sqrt d);
//   p      [3 parts][64 rows][kX3Keys]: A tiles of ctx (a block's weights, 32 keys per tile row).
// Tiles: 0-2 hold the three parts of an A tile, 3 each B tile in turn, 4-7 four accumulators (s: 64 keys of 16
// rows; ctx: up to 64 dims of 16 rows).
#ifndef BGEM3_ATTENTION_BF16X3_H_
#define BGEM3_ATTENTION_BF16X3_H_

#include "bf16x3_split.h"
#include "gemm_f32.h"   // PathSwitch

namespace {

// Switched on (the default; BGEM3_BF16X3_ATTENTION=0 in the environment: off) or off (attend(): the AVX-512 tile
// kernel or OpenBLAS) by m3_bf16x3_attention (tests and benchmarks), for calls of at least min_rows token rows
// (default 1); taken for head sizes that are multiples of 32.
PathSwitch x3_attention_path{"BGEM3_BF16X3_ATTENTION", 1};
inline bool x3_attention_on(int64_t rows) {
  return BGEM3_AMX_BF16 && amx_granted() && x3_attention_path.wants(rows) && !attention_blas_forced();
}

#if BGEM3_AMX_BF16
const int64_t kX3Rows = 64, kX3Keys = 128, kX3ScoreStride = kX3Keys + 16;

// One worker's scratch for attend_bf16x3 at sequences up to n tokens: offsets (in uint16s, each 64-byte aligned)
// of the bf16 regions and of the float ones (qf: scaled q; s: scores; o: one row tile's block context; acc: the
// running context; stats: running max, running sum, factor and block max per row).
struct X3Scratch {
  int64_t np, keys, values, q, p, qf, s, o, acc, stats, total = 0;
  X3Scratch(int64_t d, int64_t n) : np(round_up(std::max<int64_t>(n, 1), 64)) {
    keys = take(np * d * 3);
    values = take(np * d * 3);
    q = take(kX3Rows * d * 3);
    p = take(3 * kX3Rows * kX3Keys);
    qf = take(2 * kX3Rows * d);
    s = take(2 * kX3Rows * kX3ScoreStride);
    o = take(2 * 16 * d);
    acc = take(2 * kX3Rows * d);
    stats = take(2 * 4 * kX3Rows);
  }
  int64_t take(int64_t uint16s) {
    const int64_t at = total;
    total += round_up(uint16s, 32);
    return at;
  }
};

inline int64_t bf16x3_attention_scratch(int64_t d, int64_t longest) { return X3Scratch(d, longest).total; }

// C (+)= the part products of A tiles 0..parts-1 with B tile 3.
#define BGEM3_X3_DP(C, parts)                 \
  _tile_dpbf16ps(C, 0, 3);                    \
  if ((parts) > 1) _tile_dpbf16ps(C, 1, 3);   \
  if ((parts) > 2) _tile_dpbf16ps(C, 2, 3);
// Part p of the B tile at b (parts kPartTile apart) times the A parts that pair with it, into C if C < 4 + count.
#define BGEM3_X3_B(C, b, p, count)                   \
  if ((C) < 4 + (count)) {                           \
    _tile_loadd(3, (b) + (p) * kPartTile, 64);       \
    BGEM3_X3_DP(C, 3 - (p))                          \
  }

// Pack head t.head's keys and values of the task's sequence into the scratch's layouts.
inline void pack_heads_x3(const AttentionTask &t, const float *qkv, int64_t hidden, int64_t d, const X3Scratch &x,
                          uint16_t *base) {
  const int64_t ld = 3 * hidden, n = t.n, kd = d / 32, vd = d / 16;
  const float *k = qkv + t.start * ld + hidden + t.head * d, *v = k + hidden;
  for (int64_t i = 0; i < x.np / 16; ++i)
    for (int64_t c = 0; c < kd; ++c)
      pack_tile_nk(k + std::min(16 * i, n - 1) * ld + 32 * c, ld, std::clamp<int64_t>(n - 16 * i, 0, 16), 32,
                   base + x.keys + (i * kd + c) * 3 * kPartTile);
  for (int64_t i = 0; i < x.np / 32; ++i)
    for (int64_t c = 0; c < vd; ++c)
      pack_tile_kn(v + std::min(32 * i, n - 1) * ld + 16 * c, ld, std::clamp<int64_t>(n - 32 * i, 0, 32), 16,
                   base + x.values + (i * vd + c) * 3 * kPartTile);
}

// The high 16 bits of every float of a (words 0-15) and b (words 16-31): 32 bfloat16 truncations in one shuffle.
inline __m512i high_halves(__m512 a, __m512 b) {
  alignas(64) static const uint16_t odd[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                               33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
  return _mm512_permutex2var_epi16(_mm512_castps_si512(a), _mm512_load_si512(odd), _mm512_castps_si512(b));
}

// 32 floats (a: 0-15, b: 16-31) as their three bfloat16 parts (bf16x3_split.h's split3: hi and mid truncations,
// lo the exact rest), stored at part, part + stride, part + 2 stride.
inline void split32_to(__m512 a, __m512 b, uint16_t *part, int64_t stride) {
  const __m512 top = _mm512_castsi512_ps(_mm512_set1_epi32((int)0xFFFF0000u));
  const __m512 ra = _mm512_sub_ps(a, _mm512_and_ps(a, top)), rb = _mm512_sub_ps(b, _mm512_and_ps(b, top));
  const __m512 la = _mm512_sub_ps(ra, _mm512_and_ps(ra, top)), lb = _mm512_sub_ps(rb, _mm512_and_ps(rb, top));
  _mm512_storeu_si512(part, high_halves(a, b));
  _mm512_storeu_si512(part + stride, high_halves(ra, rb));
  _mm512_storeu_si512(part + 2 * stride, high_halves(la, lb));
}

// Rows [0, 16 tiles) of a key block's scores (nb valid keys of nbp, a multiple of 64) -> exp(s - m') split into p's
// three parts (zero past nb); updates the running max and sum and leaves each row's factor exp(m - m') (about
// 1e-38 on the first block, where m = -inf and nothing is scaled yet). bm: 16 tiles floats of scratch.
inline void x3_softmax_block(const float *s, int64_t tiles, int64_t nb, int64_t nbp, float *mx, float *sum,
                             float *factor, float *bm, uint16_t *p) {
  const int64_t rows = 16 * tiles;
  for (int64_t r = 0; r < rows; ++r) {
    const float *sr = s + r * kX3ScoreStride;
    __m512 m16 = _mm512_loadu_ps(sr);
    for (int64_t j = 16; j < nb; j += 16)
      m16 = _mm512_mask_max_ps(m16, lanes_below(nb - j), m16, _mm512_loadu_ps(sr + j));
    if (nb < 16) m16 = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), lanes_below(nb), m16);
    bm[r] = _mm512_reduce_max_ps(m16);
  }
  for (int64_t r = 0; r < rows; r += 16) {
    const __m512 old = _mm512_loadu_ps(mx + r), now = _mm512_max_ps(old, _mm512_loadu_ps(bm + r));
    _mm512_storeu_ps(factor + r, exp16(_mm512_sub_ps(old, now)));
    _mm512_storeu_ps(mx + r, now);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float *sr = s + r * kX3ScoreStride;
    const __m512 shift = _mm512_set1_ps(mx[r]);
    __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
    for (int64_t j = 0; j < nbp; j += 32) {
      __m512 e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + j), shift));
      __m512 e1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + j + 16), shift));
      if (j + 32 > nb) {
        e0 = _mm512_maskz_mov_ps(lanes_below(std::max<int64_t>(nb - j, 0)), e0);
        e1 = _mm512_maskz_mov_ps(lanes_below(std::max<int64_t>(nb - j - 16, 0)), e1);
      }
      t0 = _mm512_add_ps(t0, e0);
      t1 = _mm512_add_ps(t1, e1);
      split32_to(e0, e1, p + r * kX3Keys + j, kX3Rows * kX3Keys);
    }
    sum[r] = sum[r] * factor[r] + _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
  }
}

// ctx rows [t.row0, t.row0 + t.rows) of head t.head of the task's sequence (t.n tokens from t.start); qkv [T, 3H]
// (query | key | value), ctx [T, H]; scratch: bf16x3_attention_scratch(d, n) uint16s, 64-byte aligned. d: a
// multiple of 32.
void attend_bf16x3(const AttentionTask &t, const float *qkv, int64_t hidden, int64_t d, uint16_t *scratch,
                   float *ctx) {
  FlushDenormals ftz;
  tile_configure();
  const X3Scratch x(d, t.n);
  pack_heads_x3(t, qkv, hidden, d, x, scratch);
  const int64_t ld = 3 * hidden, kd = d / 32, vd = d / 16;
  const uint16_t *keys = scratch + x.keys, *values = scratch + x.values;
  uint16_t *qa = scratch + x.q, *p = scratch + x.p;
  float *qf = (float *)(scratch + x.qf), *s = (float *)(scratch + x.s), *o = (float *)(scratch + x.o);
  float *acc = (float *)(scratch + x.acc), *mx = (float *)(scratch + x.stats), *sum = mx + kX3Rows,
        *factor = sum + kX3Rows, *bm = factor + kX3Rows;
  const float scale = 1.0f / std::sqrt((float)d);
  for (int64_t r0 = 0; r0 < t.rows; r0 += kX3Rows) {
    const int64_t m = std::min(kX3Rows, t.rows - r0), tiles = (m + 15) / 16;
    const float *q = qkv + (t.start + t.row0 + r0) * ld + t.head * d;
    for (int64_t r = 0; r < 16 * tiles; ++r)
      for (int64_t c = 0; c < d; ++c) qf[r * d + c] = r < m ? q[r * ld + c] * scale : 0.0f;
    pack_rows(qf, d, 16 * tiles, d, qa);
    std::fill(mx, mx + kX3Rows, -INFINITY);
    std::fill(sum, sum + kX3Rows, 0.0f);
    for (int64_t j0 = 0; j0 < t.n; j0 += kX3Keys) {
      const int64_t nb = std::min(kX3Keys, t.n - j0), nbp = round_up(nb, 64);
      for (int64_t g = 0; g < tiles; ++g)      // s [16 g + 16 rows, nbp keys], 64 keys per step
        for (int64_t k0 = 0; k0 < nbp; k0 += 64) {
          _tile_zero(4);
          _tile_zero(5);
          _tile_zero(6);
          _tile_zero(7);
          for (int64_t c = 0; c < kd; ++c) {
            const uint16_t *a = qa + (g * kd + c) * 3 * kPartTile;
            _tile_loadd(0, a, 64);
            _tile_loadd(1, a + kPartTile, 64);
            _tile_loadd(2, a + 2 * kPartTile, 64);
            const int64_t step = kd * 3 * kPartTile;   // to the next 16 keys
            const uint16_t *b = keys + (((j0 + k0) / 16) * kd + c) * 3 * kPartTile;
            for (int part = 0; part < 3; ++part) {
              BGEM3_X3_B(4, b, part, 4)
              BGEM3_X3_B(5, b + step, part, 4)
              BGEM3_X3_B(6, b + 2 * step, part, 4)
              BGEM3_X3_B(7, b + 3 * step, part, 4)
            }
          }
          float *out = s + 16 * g * kX3ScoreStride + k0;
          _tile_stored(4, out, 4 * kX3ScoreStride);
          _tile_stored(5, out + 16, 4 * kX3ScoreStride);
          _tile_stored(6, out + 32, 4 * kX3ScoreStride);
          _tile_stored(7, out + 48, 4 * kX3ScoreStride);
        }
      x3_softmax_block(s, tiles, nb, nbp, mx, sum, factor, bm, p);
      for (int64_t g = 0; g < tiles; ++g) {    // o [16, d] = p [16 rows, nbp] @ v [nbp, d]; acc = acc f + o
        for (int64_t c0 = 0; c0 < vd; c0 += 4) {
          const int64_t count = std::min<int64_t>(4, vd - c0);
          _tile_zero(4);
          _tile_zero(5);
          _tile_zero(6);
          _tile_zero(7);
          for (int64_t k0 = 0; k0 < nbp; k0 += 32) {
            const uint16_t *a = p + 16 * g * kX3Keys + k0;
            _tile_loadd(0, a, 2 * kX3Keys);
            _tile_loadd(1, a + kX3Rows * kX3Keys, 2 * kX3Keys);
            _tile_loadd(2, a + 2 * kX3Rows * kX3Keys, 2 * kX3Keys);
            const uint16_t *b = values + (((j0 + k0) / 32) * vd + c0) * 3 * kPartTile;
            for (int part = 0; part < 3; ++part) {
              BGEM3_X3_B(4, b, part, count)
              BGEM3_X3_B(5, b + 3 * kPartTile, part, count)
              BGEM3_X3_B(6, b + 6 * kPartTile, part, count)
              BGEM3_X3_B(7, b + 9 * kPartTile, part, count)
            }
          }
          _tile_stored(4, o + 16 * c0, 4 * d);
          if (count > 1) _tile_stored(5, o + 16 * c0 + 16, 4 * d);
          if (count > 2) _tile_stored(6, o + 16 * c0 + 32, 4 * d);
          if (count > 3) _tile_stored(7, o + 16 * c0 + 48, 4 * d);
        }
        for (int64_t r = 0; r < 16; ++r) {
          const int64_t row = 16 * g + r;
          const __m512 f = _mm512_set1_ps(factor[row]);
          for (int64_t c = 0; c < d; c += 16) {
            float *ar = acc + row * d + c;
            const __m512 prev = j0 == 0 ? _mm512_setzero_ps() : _mm512_mul_ps(f, _mm512_loadu_ps(ar));
            _mm512_storeu_ps(ar, _mm512_add_ps(prev, _mm512_loadu_ps(o + r * d + c)));
          }
        }
      }
    }
    for (int64_t r = 0; r < m; ++r) {
      const __m512 inv = _mm512_set1_ps(1.0f / sum[r]);
      float *out = ctx + (t.start + t.row0 + r0 + r) * hidden + t.head * d;
      for (int64_t c = 0; c < d; c += 16)
        _mm512_storeu_ps(out + c, _mm512_mul_ps(inv, _mm512_loadu_ps(acc + r * d + c)));
    }
  }
  _tile_release();
}
#undef BGEM3_X3_B
#undef BGEM3_X3_DP
#else
inline int64_t bf16x3_attention_scratch(int64_t, int64_t) { return 0; }
inline void attend_bf16x3(const AttentionTask &, const float *, int64_t, int64_t, uint16_t *, float *) {}
#endif  // BGEM3_AMX_BF16

// Query rows per attention task on the tiles: a whole sequence (its keys and values are split and packed once per
// task), unless that leaves fewer than four tasks per worker, then a quarter-worker's share, in 64-row groups.
inline int64_t x3_query_block(int64_t batch, int64_t heads, int64_t longest, int64_t workers) {
  const int64_t units = std::max<int64_t>(batch * heads, 1), splits = (4 * workers + units - 1) / units;
  return round_up((longest + splits - 1) / splits, 64);
}

}  // namespace

#endif  // BGEM3_ATTENTION_BF16X3_H_
