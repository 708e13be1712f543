// int8 linear layers for the M3 encoder's CPU inference path (MindSpore ops.Custom, func_type="aot").
//
// y = x @ W^T + b, with W quantised once at load (symmetric int8 per output channel: W[j] ~= sw[j] * q[j])
// and each row of x quantised inside the kernel (asymmetric uint8: x[i] ~= sa[i] * (u[i] - z[i]),
// u in [0, 255], zero point z[i] in [0, 255]):
//   y[i, j] = sa[i] * sw[j] * (sum_k u[i, k] q[j, k] - z[i] * wsum[j]) + b[j],   wsum[j] = sum_k q[j, k].
// The bracket is exact in int32 (|u q| <= 255 * 127: no overflow below K = 66,000).
//
// Packed weights (kernels/int8.py, pack_weight): int8 [P = ceil(N/64)][KQ = ceil(K/4)][64 columns x 4 k],
// zero padded. One 64-byte vector holds 4 consecutive k of 16 columns: the operand AVX-512 VNNI's vpdpbusd
// takes (u8 x s8, each group of 4 products summed into an int32 lane). The register tile is 6 rows x 64
// columns (24 zmm accumulators); each k-step broadcasts 4 bytes of every row against 4 weight vectors.
// With AMX (Sapphire Rapids and later, K a multiple of 64) 32 rows x 64 columns at a time run on the tile unit
// instead (amx_tile), 1.4-2x the VNNI kernel's throughput on the encoder's shapes. Without AVX512-VNNI a scalar
// loop computes the same integers (correct, slow). All three give bit-identical outputs.
//
// The fused sub-layers keep everything but the four linear maps in float32, exactly as cpu_kernels.cc
// (attention scores / softmax / context, GELU, bias, residual, layer norm), sharing its helpers through
// kernels_common.h; attention's two products run in bfloat16 instead on AMX-BF16 CPUs (attention_bf16.h) and on
// AVX512-BF16 CPUs without AMX (attention_dpbf16.h).
#include "kernels_common.h"

#include <atomic>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define BGEM3_VNNI 1
#else
#define BGEM3_VNNI 0
#endif

// AMX (Sapphire Rapids and later): one TDPBUSD multiplies a 16 x 64 uint8 tile by a 64 x 16 int8 tile into
// 16 x 16 int32, the same integers as vpdpbusd. The packed panel's rows (one per k-group, 64 columns x 4 k) are
// already AMX's B layout: 16 columns of 16 k-groups form one tile at row stride 256 bytes.
#include "attention_bf16.h"     // includes attention_dpbf16.h
#if BGEM3_VNNI && BGEM3_AMX_TILE && defined(__AMX_INT8__)
#define BGEM3_AMX 1
#else
#define BGEM3_AMX 0
#endif

namespace {

const int64_t kPanel = 64;      // output columns per packed panel (4 zmm of 16 int32)
const int kTile = 6;            // rows per register tile
const int64_t kAmxRows = 32;    // rows per AMX step (two 16-row tiles)
const int64_t kMaxBlock = 96;   // rows per work item (a multiple of kTile)
const int64_t kAmxMaxBlock = 256;  // with AMX: more rows share each weight panel read from L3

// AMX in use for the int8 products: compiled in, the OS granted this process the tile state, and not switched
// off (m3_int8_amx, for tests and benchmarks).
std::atomic<int> amx_wanted{1}, bf16_attention_wanted{1};
bool amx_on() { return BGEM3_AMX && amx_granted() && amx_wanted.load(std::memory_order_relaxed); }

// Where the int8 path's attention runs in bfloat16 for head size d, if it does (m3_int8_bf16_attention switches it):
// on AMX tiles (attention_bf16.h: compiled in, the int8 products' AMX on, d a multiple of 32 up to 64), else with
// AVX512-BF16 dot products (attention_dpbf16.h: compiled in, d a multiple of 16 up to 256); kFloat32:
// kernels_common.h's.
enum class AttentionKind { kFloat32, kAmx, kDot };
AttentionKind bf16_attention_path(int64_t d) {
  if (!bf16_attention_wanted.load(std::memory_order_relaxed)) return AttentionKind::kFloat32;
  if (BGEM3_AMX_BF16 && amx_on() && d % 32 == 0 && d <= 64) return AttentionKind::kAmx;
  if (BGEM3_DPBF16 && d % 16 == 0 && d <= 256) return AttentionKind::kDot;
  return AttentionKind::kFloat32;
}

// Quantised rows: u [rows, kp] (kp = K rounded up to 4, the tail zero), scale and zero point per row.
struct QRows {
  AlignedVector<uint8_t> u;   // a tile operand: 64-byte aligned
  std::vector<float> scale;
  std::vector<int32_t> zero;
  int64_t kp = 0;
  void resize(int64_t rows, int64_t k) {
    kp = (k + 3) / 4 * 4;
    u.resize((rows + kAmxRows) * kp);             // an AMX step may read up to 31 rows past the last one
    scale.resize(rows);
    zero.resize(rows);
  }
};

// Weights as passed in: packed [P, KQ, 256] int8, scale [N], wsum [N] int32, bias [N] (or null).
struct QWeight {
  const int8_t *packed;
  const float *scale;
  const int32_t *wsum;
  const float *bias;
  int64_t n, kq, panels;
};

// u = clamp(rint(x / s) + z, 0, 255) with s = (hi - lo) / 255, z = rint(-lo / s), lo = min(x, 0),
// hi = max(x, 0): every x in [lo, hi] maps to u within half a step. False if x holds NaN or inf.
bool quantize_row(const float *x, int64_t k, int64_t kp, uint8_t *u, float *scale, int32_t *zero) {
  float lo = 0.0f, hi = 0.0f, probe = 0.0f;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(+ : probe)
  for (int64_t j = 0; j < k; ++j) {
    lo = x[j] < lo ? x[j] : lo;
    hi = x[j] > hi ? x[j] : hi;
    probe += x[j] * 0.0f;                           // NaN exactly when some x is NaN or infinite
  }
  const float range = hi - lo;
  if (probe != 0.0f || !(range <= 3.0e38f)) return false;
  std::memset(u + k, 0, kp - k);
  if (range == 0.0f) {                              // an all-zero row
    std::memset(u, 0, k);
    *scale = 0.0f;
    *zero = 0;
    return true;
  }
  const float inv = 255.0f / range;
  int32_t z = (int32_t)std::nearbyint(-lo * inv);
  z = z < 0 ? 0 : (z > 255 ? 255 : z);
  int64_t j = 0;
#if BGEM3_VNNI
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i vz = _mm512_set1_epi32(z), v0 = _mm512_setzero_si512();
  for (; j < k; j += 16) {                          // cvtps rounds to nearest even, as rint; usepi8 caps at 255
    const __mmask16 m = k - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - j)) - 1);
    __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), vinv)), vz);
    _mm512_mask_cvtusepi32_storeu_epi8(u + j, m, _mm512_max_epi32(q, v0));
  }
#endif
  for (; j < k; ++j) {
    int32_t q = (int32_t)std::nearbyint(x[j] * inv) + z;
    u[j] = (uint8_t)(q < 0 ? 0 : (q > 255 ? 255 : q));
  }
  *scale = range / 255.0f;
  *zero = z;
  return true;
}

// acc [R, 64] = int32 products of R quantised rows a (stride lda) with one packed panel b (kq x 256 bytes).
template <int R>
inline void dot_tile(const uint8_t *a, int64_t lda, const int8_t *b, int64_t kq, int32_t *acc) {
#if BGEM3_VNNI
  __m512i c[R][4];                                  // constant indices only: the compiler keeps them in registers
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) c[r][v] = _mm512_setzero_si512();
  for (int64_t q = 0; q < kq; ++q, b += 4 * kPanel) {
    const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64);
    const __m512i b2 = _mm512_loadu_si512(b + 128), b3 = _mm512_loadu_si512(b + 192);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, a + r * lda + 4 * q, 4);
      const __m512i av = _mm512_set1_epi32(four);
      c[r][0] = _mm512_dpbusd_epi32(c[r][0], av, b0);
      c[r][1] = _mm512_dpbusd_epi32(c[r][1], av, b1);
      c[r][2] = _mm512_dpbusd_epi32(c[r][2], av, b2);
      c[r][3] = _mm512_dpbusd_epi32(c[r][3], av, b3);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_storeu_si512(acc + r * kPanel + 16 * v, c[r][v]);
#else
  std::fill(acc, acc + R * kPanel, 0);
  for (int64_t q = 0; q < kq; ++q, b += 4 * kPanel)
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < kPanel; ++j)
        for (int t = 0; t < 4; ++t) acc[r * kPanel + j] += (int32_t)a[r * lda + 4 * q + t] * (int32_t)b[4 * j + t];
#endif
}

// y[r, col] = sa[r] * sw[col] * (acc[r, col - col0] - za[r] * wsum[col]) (+ bias[col]) for rows [0, rows) and
// columns [col0, min(col0 + 64, n)); y has leading dimension ldy.
void dequantise(const int32_t *acc, int64_t rows, const float *sa, const int32_t *za, const QWeight &w, int64_t col0,
                float *y, int64_t ldy) {
  const int64_t end = std::min(col0 + kPanel, w.n);
  for (int64_t r = 0; r < rows; ++r) {
    float *yr = y + r * ldy;
    const int32_t *ar = acc + r * kPanel;        // column col is ar[col - col0]
    int64_t col = col0;
#if BGEM3_VNNI
    const __m512i vz = _mm512_set1_epi32(za[r]);
    const __m512 vs = _mm512_set1_ps(sa[r]);
    for (; col < end; col += 16) {
      const __mmask16 m = end - col >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (end - col)) - 1);
      const __m512i ws = _mm512_maskz_loadu_epi32(m, w.wsum + col);
      const __m512i exact = _mm512_sub_epi32(_mm512_loadu_si512(ar + (col - col0)), _mm512_mullo_epi32(vz, ws));
      const __m512 s = _mm512_mul_ps(vs, _mm512_maskz_loadu_ps(m, w.scale + col));
      __m512 out = _mm512_cvtepi32_ps(exact);
      out = w.bias ? _mm512_fmadd_ps(out, s, _mm512_maskz_loadu_ps(m, w.bias + col)) : _mm512_mul_ps(out, s);
      _mm512_mask_storeu_ps(yr + col, m, out);
    }
#endif
    for (; col < end; ++col) {
      const float out = (float)(ar[col - col0] - za[r] * w.wsum[col]) * (sa[r] * w.scale[col]);
      yr[col] = w.bias ? out + w.bias[col] : out;
    }
  }
}

#if BGEM3_AMX
// acc [32, 64] = int32 products of 32 quantised rows a (stride lda; kq a multiple of 16) with one packed panel.
void amx_tile(const uint8_t *a, int64_t lda, const int8_t *b, int64_t kq, int32_t *acc) {
  for (int64_t half = 0; half < 2; ++half) {        // columns 32 * half .. 32 * half + 31
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t q = 0; q < kq; q += 16) {
      _tile_loadd(4, a + 4 * q, lda);
      _tile_loadd(5, a + 16 * lda + 4 * q, lda);
      const int8_t *bq = b + q * 4 * kPanel + half * 128;
      _tile_loadd(6, bq, 4 * kPanel);
      _tile_loadd(7, bq + 64, 4 * kPanel);
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(1, 4, 7);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
    int32_t *c = acc + half * 32;
    _tile_stored(0, c, 4 * kPanel);
    _tile_stored(1, c + 16, 4 * kPanel);
    _tile_stored(2, c + 16 * kPanel, 4 * kPanel);
    _tile_stored(3, c + 16 * kPanel + 16, 4 * kPanel);
  }
}
#endif

void gelu_panel(float *y, int64_t ldy, int64_t rows, int64_t col0, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float *yr = y + r * ldy + col0;
    for (int64_t j = 0; j < cols; ++j) yr[j] = gelu_erf(yr[j]);
  }
}

// y[0:rows, panels p0..p1) = dequantised (a @ q^T) (+ bias), GELU optional: one work item.
void qgemm(const QRows &a, int64_t row0, int64_t rows, const QWeight &w, int64_t p0, int64_t p1, float *y,
           int64_t ldy, bool gelu) {
#if BGEM3_AMX
  if (a.kp % 64 == 0 && amx_on()) {
    alignas(64) int32_t acc[kAmxRows * kPanel];
    tile_configure();
    for (int64_t p = p0; p < p1; ++p) {
      const int8_t *b = w.packed + p * w.kq * 4 * kPanel;
      for (int64_t r = 0; r < rows; r += kAmxRows) {
        const int64_t i = row0 + r;
        amx_tile(a.u.data() + i * a.kp, a.kp, b, w.kq, acc);
        dequantise(acc, std::min(kAmxRows, rows - r), a.scale.data() + i, a.zero.data() + i, w, p * kPanel,
                   y + r * ldy, ldy);
      }
      if (gelu) gelu_panel(y, ldy, rows, p * kPanel, std::min(kPanel, w.n - p * kPanel));
    }
    _tile_release();
    return;
  }
#endif
  alignas(64) int32_t acc[kTile * kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t *b = w.packed + p * w.kq * 4 * kPanel;
    for (int64_t r = 0; r < rows; r += kTile) {
      const int64_t i = row0 + r;
      const uint8_t *u = a.u.data() + i * a.kp;
      const float *sa = a.scale.data() + i;
      const int32_t *za = a.zero.data() + i;
      const int64_t n = std::min<int64_t>(kTile, rows - r);
      switch (n) {
        case 6: dot_tile<6>(u, a.kp, b, w.kq, acc); break;
        case 5: dot_tile<5>(u, a.kp, b, w.kq, acc); break;
        case 4: dot_tile<4>(u, a.kp, b, w.kq, acc); break;
        case 3: dot_tile<3>(u, a.kp, b, w.kq, acc); break;
        case 2: dot_tile<2>(u, a.kp, b, w.kq, acc); break;
        default: dot_tile<1>(u, a.kp, b, w.kq, acc); break;
      }
      dequantise(acc, n, sa, za, w, p * kPanel, y + r * ldy, ldy);
    }
    if (gelu) gelu_panel(y, ldy, rows, p * kPanel, std::min(kPanel, w.n - p * kPanel));
  }
}

// Rows per work item: all workers busy, a multiple of the tile, at most kMaxBlock.
int64_t int8_block(int64_t rows) {
  const bool amx = amx_on();
  const int64_t workers = omp_get_max_threads(), tile = amx ? kAmxRows : kTile;
  const int64_t most = amx ? kAmxMaxBlock : kMaxBlock;
  int64_t b = (rows + workers - 1) / workers;
  b = (b + tile - 1) / tile * tile;
  return b < tile ? tile : (b > most ? most : b);
}

// Work items of a whole product [rows, N]: row blocks x groups of panels (columns are split only when
// there are fewer row blocks than twice the workers, e.g. a few short queries).
struct Tiling {
  int64_t block, row_items, per_group, groups;
  Tiling(int64_t rows, int64_t panels) : block(int8_block(rows)) {
    row_items = (rows + block - 1) / block;
    const int64_t want = (2 * omp_get_max_threads() + row_items - 1) / row_items;
    groups = std::max<int64_t>(1, std::min(panels, want));
    per_group = (panels + groups - 1) / groups;
    groups = (panels + per_group - 1) / per_group;
  }
  int64_t items() const { return row_items * groups; }
};

// Item t of tiling tl: quantised rows a (all rows) -> y [rows, n].
void run_item(const Tiling &tl, int64_t t, const QRows &a, int64_t rows, const QWeight &w, float *y, bool gelu) {
  const int64_t r0 = (t / tl.groups) * tl.block, g = t % tl.groups;
  const int64_t p0 = g * tl.per_group, p1 = std::min(w.panels, p0 + tl.per_group);
  qgemm(a, r0, std::min(tl.block, rows - r0), w, p0, p1, y + r0 * w.n, w.n, gelu);
}

// params[i..i+3] = packed, scale, wsum, bias of a [n, k] layer; false if the shapes disagree.
bool weight_at(void **params, int *ndims, int64_t **shapes, int i, int64_t k, QWeight &w) {
  if (ndims[i] != 3 || ndims[i + 1] != 1 || ndims[i + 2] != 1 || ndims[i + 3] != 1) return false;
  w = {(const int8_t *)params[i], (const float *)params[i + 1], (const int32_t *)params[i + 2],
       (const float *)params[i + 3], shapes[i + 1][0], shapes[i][1], shapes[i][0]};
  return shapes[i][2] == 4 * kPanel && w.kq == (k + 3) / 4 && w.panels == (w.n + kPanel - 1) / kPanel &&
         shapes[i + 2][0] == w.n && shapes[i + 3][0] == w.n && w.n > 0 && k > 0;
}

}  // namespace

extern "C" {

// 0 if the BLAS symbols resolved (checked by kernels/cpu.py build_library).
int m3_blas_ready() { return blas().sgemm ? 0 : 1; }

// Bytes in this library's cache of freed multi-MiB buffers (block_cache.h); release != 0: unmap them first.
int64_t m3_int8_block_cache(int release) { return block_cache_bytes(release); }

// 1 if this build runs the AVX-512 VNNI micro-kernel, 0 for the scalar fallback.
int m3_int8_vnni() { return BGEM3_VNNI; }

// Switch the AMX micro-kernel on (1) or off (0: VNNI), or only ask (-1); returns 1 if products with K a multiple
// of 64 run on AMX (compiled in, granted by the OS, switched on). Both give the same integers.
int m3_int8_amx(int on) {
  if (on >= 0) amx_wanted.store(on ? 1 : 0);
  return amx_on() ? 1 : 0;
}

// Attention in bfloat16 on (1) or off (0: float32), or only ask (-1); returns where it runs for head size 64:
// 0 float32, 1 AMX tiles, 2 AVX512-BF16 dot products (m3_int8_amx(0) moves it from AMX to those).
int m3_int8_bf16_attention(int on) {
  if (on >= 0) bf16_attention_wanted.store(on ? 1 : 0);
  return (int)bf16_attention_path(64);
}

// y [..., N] = x [..., K] @ W^T + b.  inputs: x, packed, scale [N], wsum [N] i32, bias [N].
// Returns 2 on inconsistent shapes, 3 if x holds NaN or inf.
int m3_int8_linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 6 || ndims[0] < 1) return 1;
  const int64_t k = shapes[0][ndims[0] - 1], rows = k > 0 ? numel(ndims[0], shapes[0]) / k : 0;
  QWeight w;
  if (!weight_at(params, ndims, shapes, 1, k, w)) return 2;
  const float *x = (const float *)params[0];
  float *y = (float *)params[5];
  QRows a;
  a.resize(rows, k);
  const Tiling tl(rows, w.panels);
  int bad = 0;
#pragma omp parallel
  {
#pragma omp for schedule(static) reduction(| : bad)
    for (int64_t i = 0; i < rows; ++i)
      bad |= !quantize_row(x + i * k, k, a.kp, a.u.data() + i * a.kp, &a.scale[i], &a.zero[i]);
    if (!bad) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tl.items(); ++t) run_item(tl, t, a, rows, w, y, false);
    }
  }
  return bad ? 3 : 0;
}

// Self-attention sub-layer, int8 projections: y = LayerNorm(x + Attention(x) @ Wo^T + bo).
// inputs: x [T, H]; qkv: packed, scale, wsum, bias [3H]; out: packed, scale, wsum, bias [H];
//         gamma, beta, eps [1], offsets [B+1] i32, heads [1] i32.
int m3_int8_attention_block(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 15 || !blas().sgemm || ndims[0] != 2) return 1;
  const float *x = (const float *)params[0], *gamma = (const float *)params[9], *beta = (const float *)params[10];
  const float eps = *(const float *)params[11];
  const int32_t *offsets = (const int32_t *)params[12];
  const int64_t heads = *(const int32_t *)params[13], rows = shapes[0][0], h = shapes[0][1];
  const int64_t batch = shapes[12][0] - 1, qblock = 256;
  float *y = (float *)params[14];
  QWeight wqkv, wo;
  if (!weight_at(params, ndims, shapes, 1, h, wqkv) || !weight_at(params, ndims, shapes, 5, h, wo) ||
      wqkv.n != 3 * h || wo.n != h)
    return 2;
  std::vector<AttentionTask> tasks;
  int64_t longest = 1;
  if (heads < 1 || h % heads || batch < 0 || !attention_tasks(offsets, batch, heads, rows, qblock, tasks, longest))
    return 2;
  const int64_t d = h / heads, ntasks = (int64_t)tasks.size(), block = int8_block(rows);
  QRows a;
  a.resize(rows, h);
  Scratch qkv(rows * 3 * h), ctx(rows * h);
  const Tiling tl(rows, wqkv.panels);
  int bad = 0;
  SingleThreadedBlas one;
  const AttentionKind path = bf16_attention_path(d);
#if BGEM3_AMX_BF16
  Bf16Attention att{{h, d, heads, {}, {}, {}}, {}};
  if (path == AttentionKind::kAmx) att.prepare(offsets, batch, rows);
#endif
#if BGEM3_DPBF16
  DpBf16Attention dot{{h, d, heads, {}, {}, {}}};
  if (path == AttentionKind::kDot) dot.prepare(offsets, batch);
#endif
#pragma omp parallel
  {
#pragma omp for schedule(static) reduction(| : bad)
    for (int64_t i = 0; i < rows; ++i)
      bad |= !quantize_row(x + i * h, h, a.kp, a.u.data() + i * a.kp, &a.scale[i], &a.zero[i]);
    if (!bad) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tl.items(); ++t) run_item(tl, t, a, rows, wqkv, qkv.data(), false);
      if (path == AttentionKind::kAmx) {
#if BGEM3_AMX_BF16
        att.pack(qkv.data(), offsets, batch, rows);
        Scratch scratch(Bf16Attention::scratch_floats(d, longest));
        tile_configure();
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < ntasks; ++i) {
          const AttentionTask &t = tasks[i];
          att.attend(t.seq, t.start, t.n, t.head, t.row0, t.rows, scratch.data(), ctx.data());
        }
        _tile_release();
#endif
      } else if (path == AttentionKind::kDot) {
#if BGEM3_DPBF16
        dot.pack(qkv.data(), offsets, batch);
        Scratch scratch(DpBf16Attention::scratch_floats(d, longest));
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < ntasks; ++i) dot.attend(tasks[i], qkv.data(), scratch.data(), ctx.data());
#endif
      } else {
        Scratch scores(attention_scratch(d, longest, qblock));
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < ntasks; ++i) attend(tasks[i], qkv.data(), h, d, scores.data(), ctx.data());
      }
      QRows c;                                      // this worker's block of quantised context rows
      c.resize(block, h);
#pragma omp for schedule(dynamic, 1)
      for (int64_t r0 = 0; r0 < rows; r0 += block) {
        const int64_t n = std::min(block, rows - r0);
        for (int64_t i = 0; i < n; ++i)
          quantize_row(ctx.data() + (r0 + i) * h, h, c.kp, c.u.data() + i * c.kp, &c.scale[i], &c.zero[i]);
        QWeight nobias = wo;
        nobias.bias = nullptr;                      // added with the residual, before the norm
        qgemm(c, 0, n, nobias, 0, wo.panels, y + r0 * h, h, false);
        for (int64_t i = r0; i < r0 + n; ++i) add_layer_norm(y + i * h, wo.bias, x + i * h, gamma, beta, h, eps);
      }
    }
  }
  return bad ? 3 : 0;
}

// Feed-forward sub-layer, int8 linears: y = LayerNorm(x + GELU(x @ W1^T + b1) @ W2^T + b2). Each worker takes
// a block of rows through both products (the [block, F] intermediate stays in its cache).
// inputs: x [T, H]; inner: packed, scale, wsum, bias [F]; outer: packed, scale, wsum, bias [H]; gamma, beta, eps.
int m3_int8_ffn_block(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (nparam != 13 || ndims[0] != 2) return 1;
  const float *x = (const float *)params[0], *gamma = (const float *)params[9], *beta = (const float *)params[10];
  const float eps = *(const float *)params[11];
  float *y = (float *)params[12];
  const int64_t rows = shapes[0][0], h = shapes[0][1];
  QWeight w1, w2;
  if (!weight_at(params, ndims, shapes, 1, h, w1) || !weight_at(params, ndims, shapes, 5, w1.n, w2) || w2.n != h)
    return 2;
  const int64_t f = w1.n, block = int8_block(rows);
  int bad = 0;
#pragma omp parallel
  {
    QRows a, inner_q;
    a.resize(block, h);
    inner_q.resize(block, f);
    Scratch inner(block * f);
    QWeight outer = w2;
    outer.bias = nullptr;                           // added with the residual, before the norm
#pragma omp for schedule(dynamic, 1) reduction(| : bad)
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      const int64_t n = std::min(block, rows - r0);
      int ok = 1;
      for (int64_t i = 0; i < n; ++i)
        ok &= quantize_row(x + (r0 + i) * h, h, a.kp, a.u.data() + i * a.kp, &a.scale[i], &a.zero[i]);
      if (!ok) {
        bad = 1;
        continue;
      }
      qgemm(a, 0, n, w1, 0, w1.panels, inner.data(), f, true);
      for (int64_t i = 0; i < n; ++i)
        quantize_row(inner.data() + i * f, f, inner_q.kp, inner_q.u.data() + i * inner_q.kp, &inner_q.scale[i],
                     &inner_q.zero[i]);
      qgemm(inner_q, 0, n, outer, 0, outer.panels, y + r0 * h, h, false);
      for (int64_t i = r0; i < r0 + n; ++i) add_layer_norm(y + i * h, w2.bias, x + i * h, gamma, beta, h, eps);
    }
  }
  return bad ? 3 : 0;
}

}  // extern "C"
