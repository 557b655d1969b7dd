// Buffers for the fused scan that outlive a call and come back to be reused.
//
// A training step allocates the same large buffers every call (the saved states and gates, the
// gradients of the pre-activations: T*B*H floats and more each). From the system allocator, each is
// fresh memory: the OS maps and zeroes every page on first touch, which measured ~8% of a training step
// at B = 64, H = 256. The pool keeps freed blocks, keyed by their size, and hands one back to the next
// request it holds with at most a quarter to spare (the smallest such block). Tensors from it are
// ordinary CPU tensors (resizable, any op accepts them); their memory is reported to torch's profiler
// like the default allocator's, so memory measurements see it.
// It holds at most 1 GiB of free blocks (set_pool_limit; 0 turns it off), and at most three times the most
// bytes it has had in use at once (pool_peak_bytes, set_pool_peak_multiple): a freed block that would pass
// either evicts the longest-unused blocks first, so a new working set (another layer size, another batch's
// length) replaces an old one instead of finding the pool full.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace rnnkit {

constexpr size_t kPoolMinBytes = size_t(1) << 16;       // smaller requests: at::empty (malloc reuses them)

// at::empty(sizes, options) for a CPU tensor, its memory from the pool when it is large.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes of free blocks the pool holds now; release_pool() returns them all to the system.
int64_t pool_held_bytes();
void release_pool();
// The most bytes of pooled tensors alive at once, since the last release_pool().
int64_t pool_peak_bytes();
// Sets the most bytes of free blocks held (returns the previous limit); 0: no pooling.
int64_t set_pool_limit(int64_t bytes);
// Sets the most free bytes held as a multiple of the peak in use (default 3; returns the previous one); 0: the
// byte limit only.
int64_t set_pool_peak_multiple(int64_t multiple);

}  // namespace rnnkit
