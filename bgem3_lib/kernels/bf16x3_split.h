// Float32 values as bfloat16 triples, split and packed into AMX tiles (for gemm_bf16x3.h).
//
// Every float32 value splits exactly into three bfloat16 parts, x = hi + mid + lo: hi and mid are truncations to
// 8 significant bits (hi of x, mid of x - hi) and lo = x - hi - mid has at most 8 left, so it is a bfloat16 too;
// |mid| < 2^-7 |x| and |lo| < 2^-15 |x|. Then
//   x w = hi hi' + (hi mid' + mid hi') + (hi lo' + lo hi' + mid mid') + [mid lo' + lo mid' + lo lo'],
// where the bracketed terms add up to less than 2^-21 |x w| (float32 rounds one product to 2^-24) and are left
// out: six bfloat16 products per float32 product, each exact in float32, accumulated in float32 by TDPBF16PS.
// Over a dot product the summation's rounding dominates: against float64 the error measures 1-2 units of
// float32 roundoff of sum |x w|, the BLAS's 0.8-4 (tests/kernels/test_gemm_bf16x3.py). Infinite inputs give NaN
// (inf - inf in the split); numbers below 2^-126 count as zero (the tile unit flushes denormals).
//
// Tiles are 16 rows x 64 bytes (32 bfloat16; pairs of consecutive k as one dword, AMX's layout); a B tile (from a
// weight) has k pairs as rows, an A tile (from tokens) has rows as rows.
#ifndef BGEM3_BF16X3_SPLIT_H_
#define BGEM3_BF16X3_SPLIT_H_

#include "amx.h"

namespace {

#if BGEM3_AMX_BF16
const int64_t kPartTile = 512;   // bfloat16 values per tile (16 rows x 32)

// The three parts of 16 floats, as 16 bfloat16 each.
inline void split3(__m512 x, __m256i &hi, __m256i &mid, __m256i &lo) {
  const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u);
  const __m512i h = _mm512_and_si512(_mm512_castps_si512(x), top);
  const __m512 r1 = _mm512_sub_ps(x, _mm512_castsi512_ps(h));
  const __m512i m = _mm512_and_si512(_mm512_castps_si512(r1), top);
  hi = _mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16));
  mid = _mm512_cvtepi32_epi16(_mm512_srli_epi32(m, 16));
  lo = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(r1, _mm512_castsi512_ps(m)));
}

// 32 floats from p (the first `count` of them; the rest read as zero) as 3 x 32 bfloat16 parts.
inline void split32(const float *p, int64_t count, __m512i part[3]) {
  const __mmask16 m0 = lanes_below(count), m1 = lanes_below(count - 16 > 0 ? count - 16 : 0);
  __m256i a[3], b[3];
  split3(_mm512_maskz_loadu_ps(m0, p), a[0], a[1], a[2]);
  split3(_mm512_maskz_loadu_ps(m1, p + 16), b[0], b[1], b[2]);
  for (int i = 0; i < 3; ++i) part[i] = _mm512_inserti64x4(_mm512_castsi256_si512(a[i]), b[i], 1);
}

// r[i] dword j <- r[j] dword i: a 16 x 16 transpose of dwords in 64 shuffles (32-bit, 64-bit, then 128-bit lanes
// twice). E.g. r[i] = (16 i, 16 i + 1, ..., 16 i + 15) becomes r[j] = (j, 16 + j, ..., 240 + j).
inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {   // b[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i + 3
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {   // column 4L + c gathers lane L of b[c], b[4 + c], b[8 + c], b[12 + c]
    const __m512i d0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), d1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
    const __m512i e0 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44),
                  e1 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(d0, e0, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(d0, e0, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(d1, e1, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(d1, e1, 0xDD);
  }
}

// One B tile of y = x @ W^T from W stored [n, k] at w (row stride ldw; its first `rows` <= 16 rows and `count` <= 32
// columns are read, the rest zero): tile column j is row j of W, whose 32 values, split, are 16 pairs (dwords) per
// part, one per tile row, so each part is a 16 x 16 dword transpose (transpose16, in registers).
inline void pack_tile_nk(const float *w, int64_t ldw, int64_t rows, int64_t count, uint16_t *tile) {
  __m512i part[3][16];
  for (int64_t j = 0; j < 16; ++j) {
    __m512i p3[3];
    split32(w + std::min<int64_t>(j, std::max<int64_t>(rows - 1, 0)) * ldw, j < rows ? count : 0, p3);
    for (int p = 0; p < 3; ++p) part[p][j] = p3[p];
  }
  for (int p = 0; p < 3; ++p) {
    transpose16(part[p]);
    for (int r = 0; r < 16; ++r) _mm512_storeu_si512(tile + p * kPartTile + r * 32, part[p][r]);
  }
}

// The same from W stored [k, n] (y = x @ W, as in a backward pass; its first `count` <= 32 rows and `cols` <= 16
// columns read): tile row r pairs rows 2r and 2r + 1 of W, 16 columns each.
inline void pack_tile_kn(const float *w, int64_t ldw, int64_t count, int64_t cols, uint16_t *tile) {
  const __mmask16 mask = lanes_below(std::max<int64_t>(0, cols));
  for (int64_t r = 0; r < 16; ++r) {
    __m512i pair[3];
    for (int e = 0; e < 2; ++e) {
      const int64_t kk = 2 * r + e;
      __m256i part[3];
      split3(_mm512_maskz_loadu_ps(kk < count ? mask : 0, w + std::min(kk, std::max<int64_t>(count - 1, 0)) * ldw),
             part[0], part[1], part[2]);
      for (int p = 0; p < 3; ++p) {
        const __m512i wide = _mm512_cvtepu16_epi32(part[p]);   // element 2r in the low half of each dword
        pair[p] = e == 0 ? wide : _mm512_or_si512(pair[p], _mm512_slli_epi32(wide, 16));
      }
    }
    for (int p = 0; p < 3; ++p) _mm512_storeu_si512(tile + p * kPartTile + r * 32, pair[p]);
  }
}

// Split and pack rows [0, m) of x (row stride ldx, k columns) into a: [ceil(m / 16)][kb][3][16][32].
inline void pack_rows(const float *x, int64_t ldx, int64_t m, int64_t k, uint16_t *a) {
  const int64_t kb = (k + 31) / 32, groups = (m + 15) / 16;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t b = 0; b < kb; ++b) {
      uint16_t *tile = a + (g * kb + b) * 3 * kPartTile;
      for (int64_t r = 0; r < 16; ++r) {
        const int64_t row = g * 16 + r;
        __m512i part[3];
        split32(x + row * ldx + b * 32, row < m ? std::min<int64_t>(32, k - b * 32) : 0, part);
        for (int p = 0; p < 3; ++p) _mm512_storeu_si512(tile + p * kPartTile + r * 32, part[p]);
      }
    }
}
#endif  // BGEM3_AMX_BF16

}  // namespace

#endif  // BGEM3_BF16X3_SPLIT_H_
