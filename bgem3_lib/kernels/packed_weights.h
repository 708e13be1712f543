// Float32 weights packed ahead of the kernel calls for gemm_f32.h, and kept across them: a model's linear layers
// packed once (cpu_kernels.cc's m3_f32_pack, called by kernels/packed.py) instead of once per call. Per call,
// packing reads and writes every weight: skipping it made M3-small encodes of 8 x 128 tokens 1.04x faster (AMD EPYC
// Zen 5, paired in one process over 30 rounds); kept, the packed weights are a second copy in memory, so
// kernels/packed.py packs only models under a memory budget.
//
// The weights of one kernel call form a set, registered under an id (> 0); a call passes the id, and each of its
// weights finds its packing by address. A packing is used only while it still describes its weight: the same
// address, shape and k block (f32_block_k, which the whole-k setting moves), and the same sample of values (one
// per row, weight_sample); otherwise the call packs as it always did. So a weight changed in place after packing
// costs speed, not correctness, wherever the sample sees the change (a training step changes every value);
// kernels/packed.py also drops a model's packings when it trains or loads weights.
//
// Worked example: W [40, 300] packs into 2 panels x 300 k x 32 columns (f32_packed_size = 19,200 floats, the last
// panel's 24 columns past n zero), exactly what Products packs per call, so products are bit for bit the same.
#ifndef BGEM3_PACKED_WEIGHTS_H_
#define BGEM3_PACKED_WEIGHTS_H_

#include <map>
#include <memory>
#include <mutex>

#include "gemm_f32.h"

namespace {

struct PackedWeight {
  const float *w = nullptr;   // the weight it was packed from, W [n, k] row-major
  int64_t n = 0, k = 0, kblock = 0;
  uint64_t sample = 0;
  AlignedArray<float> data;   // f32_packed_size(n, k) floats, F32Weight's layout
  AlignedArray<uint16_t> bf16;   // or Bf16x3Weight's tiles (gemm_bf16x3.h's pack_weights_ahead), kblock -1
};
using PackedSet = std::vector<PackedWeight>;

// A hash (FNV-1a over the bits) of one value per row of W [n, k] (row r: column (r * 7919) % k) and the last value.
inline uint64_t weight_sample(const float *w, int64_t n, int64_t k) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    h = (h ^ u) * 1099511628211ull;
  };
  for (int64_t r = 0; r < n; ++r) mix(w[r * k + (r * 7919) % k]);
  mix(w[n * k - 1]);
  return h;
}

struct PackedRegistry {
  std::mutex lock;
  std::map<int64_t, std::shared_ptr<const PackedSet>> sets;
  int64_t next = 1;
};

inline PackedRegistry &packed_registry() {
  static PackedRegistry registry;
  return registry;
}

// Register a packed set; returns its id (> 0).
inline int64_t register_packed(std::shared_ptr<const PackedSet> set) {
  PackedRegistry &r = packed_registry();
  std::lock_guard<std::mutex> hold(r.lock);
  const int64_t id = r.next++;
  r.sets[id] = std::move(set);
  return id;
}

// Pack `count` weights W_j [n_j, k_j] (y = x @ W_j^T) on every thread and register them; returns the set's id, or 0
// where this build has no AVX-512 kernel (nothing to pack for).
inline int64_t pack_weights(const float *const *w, const int64_t *n, const int64_t *k, int count) {
#if defined(__AVX512F__)
  auto set = std::make_shared<PackedSet>(count);
  std::vector<F32Weight> panels(count);
  for (int j = 0; j < count; ++j) {
    PackedWeight &p = (*set)[j];
    p.w = w[j], p.n = n[j], p.k = k[j];
    p.data = aligned_array<float>(f32_packed_size(n[j], k[j]));
    panels[j].allocate(n[j], k[j], p.data.get());
    p.kblock = panels[j].kblock;
    p.sample = weight_sample(w[j], n[j], k[j]);
  }
#pragma omp parallel
  for (int j = 0; j < count; ++j) panels[j].pack(w[j], k[j]);   // distinct buffers: no barrier between weights
  return register_packed(set);
#else
  (void)w, (void)n, (void)k, (void)count;
  return 0;
#endif
}

// Forget set `id` (its memory goes when no running call holds it); returns 1 if it was registered.
inline int release_weights(int64_t id) {
  PackedRegistry &r = packed_registry();
  std::lock_guard<std::mutex> hold(r.lock);
  return r.sets.erase(id) ? 1 : 0;
}

// Set `id`, held for the length of a call (null when id is 0 or unknown).
inline std::shared_ptr<const PackedSet> packed_set(int64_t id) {
  if (id <= 0) return nullptr;
  PackedRegistry &r = packed_registry();
  std::lock_guard<std::mutex> hold(r.lock);
  auto it = r.sets.find(id);
  return it == r.sets.end() ? nullptr : it->second;
}

inline int64_t packed_sets() {
  PackedRegistry &r = packed_registry();
  std::lock_guard<std::mutex> hold(r.lock);
  return (int64_t)r.sets.size();
}

// The entry of W [n, k] at `w` in `set` while it still describes W's values (see the top of this file), else null.
// Its float32 panels (data) count only at W's current k block (f32_block_k); its bf16 tiles, where it has them.
inline const PackedWeight *packed_entry(const PackedSet *set, const float *w, int64_t n, int64_t k) {
  if (set)
    for (const PackedWeight &p : *set)
      if (p.w == w && p.n == n && p.k == k) return p.sample == weight_sample(w, n, k) ? &p : nullptr;
  return nullptr;
}

}  // namespace

#endif  // BGEM3_PACKED_WEIGHTS_H_
