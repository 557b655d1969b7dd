// See pool.h.
#include "pool.h"

#include "blas.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/mm.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

namespace rnnkit {
namespace {

constexpr size_t kAlign = 64;                            // as c10's CPU allocator
constexpr size_t kPage = 4096;
size_t g_limit = size_t(1) << 30;
// The free blocks held stay within this many times the most bytes the pool has had in use at once. Lengths
// and batch sizes that vary from step to step (bucketed data) otherwise parked a block per size up to the
// limit: an LSTM (H = 128) trained on random B in [16, 64] and T in [50, 150] held 518 MB after 400 steps,
// whose largest step had ~48 MB in use. Three: inference through a stack of layers of different sizes frees
// each layer's buffers before the next layer's come, so its peak is one layer's while the blocks reused
// from pass to pass are all of them; at twice, a stack of LSTMs 256 -> 512 -> 384 -> 256 (B = 64, T = 100)
// evicted every block before its reuse and faulted 87 MB of fresh pages a pass (157 against 116 ms); at three
// neither it nor a fourth layer (-> 192) did. Deeper stacks of unequal layers re-fault some, as torch's own
// allocator does all. (Equal layers share their blocks: six of H = 256 held 44 MB, their peak.) So does a
// cycle of many shapes, e.g. two layers' inference over 8 length buckets in turn: 644 against 582 ms a pass
// without the cap; set_pool_peak_multiple(0) keeps every block (up to the limit) for such a workload.
size_t g_held_per_peak = 3;                              // set_pool_peak_multiple; 0: no such cap

struct Block {
  void* ptr;
  size_t bytes;
};

class Pool final : public c10::Allocator {
 public:
  // The smallest free block that holds n bytes and is at most a quarter larger (sequence lengths that
  // vary from batch to batch would otherwise never find their exact size, and park every freed block
  // up to the limit: 1 GiB held for MinGRU batches of T in [500, 1500]); else fresh memory.
  c10::DataPtr allocate(size_t n) override {
    size_t bytes = (n + kPage - 1) / kPage * kPage;
    void* ptr = nullptr;
    size_t in_use = 0, held = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= bytes + bytes / 4) {
        ptr = it->second.ptr;
        bytes = it->first;
        free_.erase(it);
        held_ -= bytes;
      }
      in_use = in_use_ += bytes;
      peak_ = std::max(peak_, in_use_);
      held = held_;
    }
    if (ptr == nullptr && posix_memalign(&ptr, kAlign, bytes) != 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ -= bytes;
      throw std::bad_alloc();
    }
    report(ptr, static_cast<int64_t>(bytes), in_use, held);
    auto* block = new Block{ptr, bytes};
    return {ptr, block, &Pool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(held_);
  }

  int64_t peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(peak_);
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& kv : free_) std::free(kv.second.ptr);
    free_.clear();
    held_ = 0;
    peak_ = in_use_;
  }

  static Pool& get() {
    static Pool* pool = new Pool();                      // never destroyed: tensors may outlive statics
    return *pool;
  }

 private:
  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    Pool& pool = get();
    bool keep = false;
    size_t in_use = 0, held = 0;
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      pool.in_use_ -= block->bytes;
      const size_t cap = g_held_per_peak == 0 ? g_limit : std::min(g_limit, g_held_per_peak * pool.peak_);
      if (block->bytes <= cap) {                         // make room: the longest-unused blocks go first
        while (pool.held_ + block->bytes > cap) pool.evict_oldest();
        pool.free_.emplace(block->bytes, Free{block->ptr, ++pool.clock_});
        pool.held_ += block->bytes;
        keep = true;
      }
      in_use = pool.in_use_;
      held = pool.held_;
    }
    report(block->ptr, -static_cast<int64_t>(block->bytes), in_use, held);
    if (!keep) std::free(block->ptr);
    delete block;
  }

  static void report(void* ptr, int64_t delta, size_t in_use, size_t held) {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(ptr, delta, in_use, in_use + held, c10::Device(c10::DeviceType::CPU));
    }
  }

  std::mutex mutex_;
  // Called with the lock held. A pool holds tens of blocks, so a scan for the oldest is cheap.
  void evict_oldest() {
    auto oldest = free_.begin();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second.stamp < oldest->second.stamp) oldest = it;
    }
    std::free(oldest->second.ptr);
    held_ -= oldest->first;
    free_.erase(oldest);
  }

  struct Free {
    void* ptr;
    uint64_t stamp;                                      // when it was freed: older blocks are evicted first
  };
  std::multimap<size_t, Free> free_;
  size_t held_ = 0, in_use_ = 0;
  size_t peak_ = 0;                                      // the most bytes in use at once (since clear())
  uint64_t clock_ = 0;
};

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  const size_t bytes = static_cast<size_t>(n) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (!options.device().is_cpu() || bytes < kPoolMinBytes) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &Pool::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

int64_t pool_held_bytes() { return Pool::get().held(); }

int64_t pool_peak_bytes() { return Pool::get().peak(); }

void release_pool() { Pool::get().clear(); }

int64_t set_pool_peak_multiple(int64_t multiple) {
  TORCH_CHECK(multiple >= 0, "rnnkit fused scan: the pool's multiple of its peak must be >= 0 (0: no such cap)");
  const int64_t old = static_cast<int64_t>(g_held_per_peak);
  g_held_per_peak = static_cast<size_t>(multiple);
  return old;
}

int64_t set_pool_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "rnnkit fused scan: the pool limit must be >= 0 bytes");
  const int64_t old = static_cast<int64_t>(g_limit);
  g_limit = static_cast<size_t>(bytes);
  if (bytes == 0) release_pool();
  return old;
}

// a b (a: (n, k), b: (k, m)) into a pooled (n, m) tensor: the layer's input projection x V^T for all
// steps at once (its bias is added in the scan's loop), and the gradient of its input. The largest
// buffers of a training step after the scan's own; from fresh memory each call they cost a page fault
// per 4 KiB (measured 16 ms of an 83 ms product at T = 200, B = 64, (512 -> 1536)).
namespace {

// A 2-D float matrix as blas.h's gemm takes it: row-major with leading dimension ld (trans false), or
// the transpose of such a matrix (trans true). False when its strides are neither.
bool blas_layout(const at::Tensor& t, bool& trans, int64_t& ld) {
  ld = row_major_ld(t);
  trans = ld == 0;
  if (trans) ld = row_major_ld(t.t());
  return ld > 0;
}

// out = a b + beta out, float products through the kernel's own route (blas.cpp: oneDNN where measured
// faster than torch's BLAS, which at::mm uses), anything else through ATen.
at::Tensor& mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta = 0.0) {
  bool ta = false, tb = false;
  int64_t lda = 0, ldb = 0;
  const bool routed = a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                      out.scalar_type() == at::kFloat && out.is_contiguous() && a.device().is_cpu() &&
                      b.device().is_cpu() && out.device().is_cpu() && a.numel() > 0 && b.numel() > 0 &&
                      blas_layout(a, ta, lda) && blas_layout(b, tb, ldb);
  if (!routed) {
    if (beta == 0.0) return at::mm_out(out, a, b);
    return out.addmm_(a, b, beta, 1.0);
  }
  // Written through a raw pointer: refuse what autograd would refuse, and tell it out changed.
  TORCH_CHECK(!(at::GradMode::is_enabled() && out.requires_grad()),
              "rnnkit: a product written in place into a tensor that requires grad; call it under torch.no_grad()");
  if (!out.is_inference()) out.unsafeGetTensorImpl()->bump_version();
  gemm(ta, tb, a.size(0), b.size(1), a.size(1), a.data_ptr<float>(), lda, b.data_ptr<float>(), ldb, float(beta),
       out.data_ptr<float>(), b.size(1));
  return out;
}

}  // namespace

at::Tensor pooled_mm(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0),
              "rnnkit pooled_mm: expected (n, k) and (k, m) matrices, got ", a.sizes(), " and ", b.sizes());
  at::Tensor out = pooled_empty({a.size(0), b.size(1)}, a.options());
  return mm_into(out, a, b);
}

// a b into a fresh tensor, on the kernel's route: the input weights' gradient d_gates^T x.
at::Tensor routed_mm(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0),
              "rnnkit routed_mm: expected (n, k) and (k, m) matrices, got ", a.sizes(), " and ", b.sizes());
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  return mm_into(out, a, b);
}

// out = a b + beta out in place, on the kernel's route: the parallel-scan cells' weight gradient, summed
// over blocks (beta 1), and their input's gradient written into its block (beta 0).
at::Tensor& routed_addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) && out.dim() == 2 &&
              out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "rnnkit routed_addmm_: expected out (n, m), a (n, k), b (k, m), got ", out.sizes(), ", ", a.sizes(),
              " and ", b.sizes());
  return mm_into(out, a, b, beta);
}

// An uninitialised (sizes) CPU tensor of dtype whose memory comes from the pool when it is large: what the
// parallel-scan cells return as h (T*B*H floats, faulted in page by page from fresh memory each call).
at::Tensor pooled_empty_op(at::IntArrayRef sizes, at::ScalarType dtype) {
  return pooled_empty(sizes, at::TensorOptions().dtype(dtype));
}

TORCH_LIBRARY_FRAGMENT(rnnkit_fused, m) {
  m.def("pooled_empty(int[] size, ScalarType dtype) -> Tensor", &pooled_empty_op);
  m.def("routed_addmm_(Tensor(a!) out, Tensor a, Tensor b, float beta) -> Tensor(a!)", &routed_addmm_);
  m.def("routed_linear(Tensor x, Tensor w) -> Tensor", &linear_product);     // blas.h
  m.def("pooled_mm(Tensor a, Tensor b) -> Tensor", &pooled_mm);
  m.def("routed_mm(Tensor a, Tensor b) -> Tensor", &routed_mm);
}

}  // namespace rnnkit
