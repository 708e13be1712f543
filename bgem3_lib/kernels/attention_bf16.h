// Attention in bfloat16 on AMX tiles, for the int8 path (int8_kernels.cc) on CPUs with AMX-BF16.
//
// For each (sequence, head): scores = (q / sqrt d) @ k^T and ctx = softmax(scores) @ v, where q, k, v and
// the softmax weights are rounded to bfloat16 (8 significant bits) and every product accumulates in float32
// (TDPBF16PS); the softmax itself (max, exp, sum, 1 / sum) stays float32. At 8192 tokens attention is
// 57% of the full-size model's FLOPs, which the int8 linears do not touch; on the tile unit it runs at
// several times the float32 kernel's speed. The quality cost is measured with the int8 path's
// (benchmarks/int8_quality.py); set_bf16_attention(False) keeps attention in float32.
//
// Layouts (bf16 as uint16_t; every tile 16 rows x 64 bytes, tile_configure()):
//   q  [T + 32, H]: the scaled queries, row-major (a query tile: 16 rows x 32 dims, row stride 2H bytes);
//   kb per (sequence, head) [np / 16][d / 32][16 dim pairs][16 keys][2]: one key tile (16 keys x 32 dims as
//      AMX's pair layout) per (key block, dim block);
//   vb per (sequence, head) [np / 32][d / 16][16 key pairs][16 dims][2]: one value tile per (32 keys, 16 dims);
//   np = n rounded up to 32, the padding zero.
#ifndef BGEM3_ATTENTION_BF16_H_
#define BGEM3_ATTENTION_BF16_H_

#include "amx.h"
#include "attention_dpbf16.h"   // to_bf16, bf16_scalar

namespace {

#if BGEM3_AMX_BF16
struct Bf16Attention : PackedHeads {   // kb, vb: tile operands, 64-byte aligned (AlignedVector)
  AlignedVector<uint16_t> q;

  // Scratch floats per worker for attend_bf16 at sequences up to `longest` tokens.
  static int64_t scratch_floats(int64_t d, int64_t longest) {
    const int64_t np = round_up(longest, 32);
    return 32 * key_stride(longest) + 16 * np + 16 * d + 64;   // scores, bf16 weights (as floats), one ctx tile
  }

  // The buffers for `batch` sequences of packed tokens (offsets [batch + 1], `rows` in all), zero filled.
  void prepare(const int32_t *offsets, int64_t batch, int64_t rows) {
    PackedHeads::prepare(offsets, batch);
    q.assign((rows + 32) * hidden, 0);
  }

  // Pack q (scaled), k, v of qkv [T, 3H] for all sequences and heads; every thread of a parallel region calls it
  // (the loops are shared).
  void pack(const float *qkv, const int32_t *offsets, int64_t batch, int64_t rows) {
    const int64_t ld = 3 * hidden;
    const float scale = 1.0f / std::sqrt((float)d);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) to_bf16(qkv + i * ld, hidden, scale, q.data() + i * hidden);
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t a = 0; a < heads; ++a) {
        const auto [n, k, v, kh, vh] = head(qkv, offsets, b, a);
        for (int64_t j = 0; j < n; ++j)
          for (int64_t c = 0; c < d; ++c) {
            kh[(((j / 16) * (d / 32) + c / 32) * 16 + (c % 32) / 2) * 32 + (j % 16) * 2 + c % 2] =
                bf16_scalar(k[j * ld + c]);
            vh[(((j / 32) * (d / 16) + c / 16) * 16 + (j % 32) / 2) * 32 + (c % 16) * 2 + j % 2] =
                bf16_scalar(v[j * ld + c]);
          }
      }
  }

  // ctx rows [row0, row0 + rows) of sequence b, head a (n tokens from `start`); tiles configured by the caller.
  void attend(int64_t b, int64_t start, int64_t n, int64_t a, int64_t row0, int64_t rows, float *scratch,
              float *ctx) const {
    FlushDenormals ftz;
    const int64_t np = round_up(n, 32), lk = key_stride(n), dt = d / 16;
    const uint16_t *kh = kb.data() + base[b] + a * np * d, *vh = vb.data() + base[b] + a * np * d;
    float *s = scratch, *acc = s + 32 * lk;
    uint16_t *p = (uint16_t *)(acc + 16 * d);    // [32, np] bf16 softmax weights (unnormalised)
    for (int64_t r0 = 0; r0 < rows; r0 += 32) {
      const int64_t m = std::min<int64_t>(32, rows - r0);
      const uint16_t *qt = q.data() + (start + row0 + r0) * hidden + a * d;
      for (int64_t j0 = 0; j0 < np; j0 += 32) {     // scores [32, 32] per step: 2 x 2 tiles
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t c = 0; c < d / 32; ++c) {
          _tile_loadd(4, qt + 32 * c, 2 * hidden);
          _tile_loadd(5, qt + 16 * hidden + 32 * c, 2 * hidden);
          _tile_loadd(6, kh + ((j0 / 16) * (d / 32) + c) * 512, 64);
          _tile_loadd(7, kh + ((j0 / 16 + 1) * (d / 32) + c) * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, s + j0, 4 * lk);
        _tile_stored(1, s + j0 + 16, 4 * lk);
        _tile_stored(2, s + 16 * lk + j0, 4 * lk);
        _tile_stored(3, s + 16 * lk + j0 + 16, 4 * lk);
      }
      float inv[32];
      for (int64_t r = 0; r < 32; ++r) {
        uint16_t *pr = p + r * np;
        if (r < m) {
          inv[r] = softmax_row(s + r * lk, n);
          to_bf16(s + r * lk, n, 1.0f, pr);
          std::memset(pr + n, 0, (np - n) * sizeof(uint16_t));
        } else {
          std::memset(pr, 0, np * sizeof(uint16_t));
        }
      }
      for (int64_t g = 0; g < 2 && 16 * g < m; ++g) {   // ctx [16, d] per row tile: d / 16 accumulators
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t j0 = 0; j0 < np; j0 += 32) {
          const uint16_t *vt = vh + (j0 / 32) * dt * 512;
          _tile_loadd(4, p + 16 * g * np + j0, 2 * np);
          _tile_loadd(5, vt, 64);
          _tile_dpbf16ps(0, 4, 5);
          _tile_loadd(6, vt + 512, 64);
          _tile_dpbf16ps(1, 4, 6);
          if (dt == 4) {
            _tile_loadd(7, vt + 1024, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_loadd(5, vt + 1536, 64);
            _tile_dpbf16ps(3, 4, 5);
          }
        }
        _tile_stored(0, acc, 4 * d);
        _tile_stored(1, acc + 16, 4 * d);
        if (dt == 4) {
          _tile_stored(2, acc + 32, 4 * d);
          _tile_stored(3, acc + 48, 4 * d);
        }
        for (int64_t r = 16 * g; r < std::min<int64_t>(m, 16 * g + 16); ++r) {
          float *out = ctx + (start + row0 + r0 + r) * hidden + a * d;
          const float *ar = acc + (r - 16 * g) * d;
          for (int64_t c = 0; c < d; ++c) out[c] = ar[c] * inv[r];
        }
      }
    }
  }
};
#endif  // BGEM3_AMX_BF16

}  // namespace

#endif  // BGEM3_ATTENTION_BF16_H_
