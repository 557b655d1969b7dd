// Non-temporal stores, for rows the time loop writes and does not read again before the loop ends: the
// GRU backward's d_xi and d_gh n block (dU and dV read them after the loop, as one product each), and
// under layer normalisation the forward's saved xhat and xhat_x rows (read only by the backward).
//
// An ordinary store first reads the line it writes into the cache (read for ownership): for a row that is
// written once, that read is wasted traffic, and it evicts lines the loop is about to use. A non-temporal
// store writes the line out whole. Measured, GRU B=64 T=100 H=512, backward loop alone: 45.3 -> 42.3 ms.
// They pay only for buffers larger than the caches (a streamed row that the product after the loop would
// have found in cache comes back from memory instead) and for rows of some length: GRU H = 64 (768-byte
// rows), T=200 B=64 (9.8 MB), backward 4.1-4.3 -> 4.4-4.7 ms streamed; H = 128 (1.5 KB rows) at the same
// size, 6.3-7.1 -> 6.3; H = 256, T=200 B=64, 45.5 -> 41.2.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace rnnkit {

// Buffers of at least kStreamMinBytes, in rows of at least kStreamMinRowBytes, are streamed (this box:
// 2 MB of L2 per core).
constexpr int64_t kStreamMinBytes = int64_t(8) << 20;
constexpr int64_t kStreamMinRowBytes = 1024;

inline bool worth_streaming(int64_t rows, int64_t row_bytes) {
  return row_bytes >= kStreamMinRowBytes && rows * row_bytes >= kStreamMinBytes;
}

// dst[0, n) = src[0, n): non-temporal, 16 bytes a store, where dst is 16-byte aligned and the row fills
// whole 16-byte chunks, else memcpy. Visible to other threads after stream_fence() in the writing thread.
// Wider stores change nothing here (the write-combining buffer fills a line either way): 64-byte AVX-512
// streaming stores measured the same, GRU B=64 T=100 H=512 backward 77.2-78.9 ms against 78.2-78.4.
template <typename T>
inline void stream_row(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  const size_t bytes = static_cast<size_t>(n) * sizeof(T);
  const auto at = reinterpret_cast<uintptr_t>(dst);
  const auto* s = reinterpret_cast<const char*>(src);
  auto* d = reinterpret_cast<char*>(dst);
#if defined(__SSE2__)
  if (at % 16 == 0 && bytes % 16 == 0) {
    for (size_t k = 0; k < bytes; k += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + k), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k)));
    }
    return;
  }
#endif
  (void)at;
  std::memcpy(d, s, bytes);
}

// Orders this thread's non-temporal stores before its later stores (a task's end: scan.h runs it there).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace rnnkit
