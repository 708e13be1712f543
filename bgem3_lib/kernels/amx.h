// The AMX tile unit: whether this build and this process may use it, and the one tile shape every AMX kernel here
// uses (all eight tiles 16 rows x 64 bytes). Shared by attention_bf16.h, gemm_bf16x3.h and int8_kernels.cc.
//
// BGEM3_AMX_TILE: compiled for a CPU with AMX tiles and AVX-512; BGEM3_AMX_BF16: also TDPBF16PS and AVX512-BF16.
#ifndef BGEM3_AMX_H_
#define BGEM3_AMX_H_

#include "kernels_common.h"

#if defined(__AMX_TILE__) && defined(__AVX512F__)
#define BGEM3_AMX_TILE 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define BGEM3_AMX_TILE 0
#endif
#if BGEM3_AMX_TILE && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define BGEM3_AMX_BF16 1
#else
#define BGEM3_AMX_BF16 0
#endif

namespace {

#if BGEM3_AMX_TILE
// True once the OS granted this process the AMX tile state (Linux: arch_prctl ARCH_REQ_XCOMP_PERM); asked once.
bool amx_granted() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                      18 /* XFEATURE_XTILEDATA */) == 0;
  return granted;
}

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// All eight tiles 16 rows x 64 bytes (int8: 16 x 64 uint8 / int8, int32 accumulators; bf16: 16 x 32 pairs).
void tile_configure() {
  alignas(64) TileConfig c;
  std::memset(&c, 0, sizeof(c));
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}
#else
bool amx_granted() { return false; }
#endif

}  // namespace

#endif  // BGEM3_AMX_H_
