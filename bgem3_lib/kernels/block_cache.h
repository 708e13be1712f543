// Where the kernels' multi-MiB buffers come from: blocks mapped with mmap, kept in a small cache when freed and
// handed out again to the next request they fit.
//
// Why not malloc. Each fused call takes buffers of several MiB (the AMX products' packed weights: 24 MiB for a
// full-size FFN weight; the activations; per-worker attention scratch) and frees them at its end, thousands of
// times per encode. glibc serves such sizes from its heaps once its adaptive mmap threshold has risen past them,
// and the heaps, interleaved with NumPy's and Python's allocations, kept the freed memory as holes they did not
// give back: after full-size 24 x 128-token encodes mallinfo2 counted 3.2-3.5 GB free in the heaps against 0.33 GB
// in use (peak RSS 3.6-4.9 GB, varying run to run). A fresh mmap per call instead costs its first-touch page faults
// every time (a fixed 1 MiB malloc mmap threshold made the same encodes 1.3x slower). Cached blocks cost neither.
//
// take(bytes) rounds up to whole pages and returns the smallest cached block of at least that size and at most
// twice it, else a new mapping (2 MiB pages advised: the kernels stream through these buffers). give() caches the
// block while the cache holds at most kCacheBytes, evicting smaller blocks first; beyond that it unmaps. Blocks
// are page aligned (so 64-byte aligned for the AMX tile rows) and their contents undefined, like malloc's.
//   void *p = BlockCache::get().take(n);   // n updated to the block's size
//   BlockCache::get().give(p, n);
#ifndef BGEM3_BLOCK_CACHE_H_
#define BGEM3_BLOCK_CACHE_H_

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <new>

namespace {

class BlockCache {
 public:
  static constexpr size_t kPage = 4096;
  static constexpr size_t kMinBytes = size_t(1) << 20;        // smaller requests stay with malloc
  static constexpr size_t kCacheBytes = size_t(384) << 20;    // free blocks kept at most

  // The process's cache (never destroyed: threads may give blocks back while the library unloads).
  static BlockCache &get() {
    static BlockCache *cache = new BlockCache;
    return *cache;
  }

  // A block of at least `bytes` bytes; `bytes` becomes its size (pass it back to give()).
  void *take(size_t &bytes) {
    bytes = (bytes + kPage - 1) / kPage * kPage;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= 2 * bytes) {
        void *p = it->second;
        bytes = it->first;
        cached_ -= bytes;
        free_.erase(it);
        return p;
      }
    }
    void *p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      release();
      p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
    }
#ifdef MADV_HUGEPAGE
    if (bytes >= (size_t(2) << 20)) madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return p;
  }

  // Return a block from take() (its size as take() set it).
  void give(void *p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    while (cached_ + bytes > kCacheBytes && !free_.empty() && free_.begin()->first < bytes) {
      munmap(free_.begin()->second, free_.begin()->first);
      cached_ -= free_.begin()->first;
      free_.erase(free_.begin());
    }
    if (cached_ + bytes > kCacheBytes) {
      munmap(p, bytes);
      return;
    }
    free_.emplace(bytes, p);
    cached_ += bytes;
  }

  // Unmap every cached block; returns the bytes given back.
  size_t release() {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t was = cached_;
    for (auto &b : free_) munmap(b.second, b.first);
    free_.clear();
    cached_ = 0;
    return was;
  }

  size_t cached() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void *> free_;   // size -> block
  size_t cached_ = 0;
};

// What each kernel library exports (m3_block_cache, m3_int8_block_cache, m3t_block_cache): the bytes its cache
// holds; release != 0: unmap them first and return what it held.
inline int64_t block_cache_bytes(int release) {
  return (int64_t)(release ? BlockCache::get().release() : BlockCache::get().cached());
}

}  // namespace

#endif  // BGEM3_BLOCK_CACHE_H_
