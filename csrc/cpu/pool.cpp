// A small pool of already-faulted-in buffers for the CPU kernels' large outputs.
//
// Why: the CPU training kernels (bn_add_act, bn_add_act_backward, stats_backward, the conv_stats
// prologue) write multi-megabyte outputs. glibc hands freed memory of that size back to the
// kernel (mmap threshold, heap trim), so every step faults those outputs in again, page by page,
// inside our kernels' first write. Measured (benchmarks/NOTES.md, "The pooled output path"):
// ResNet-50 training step, batch 4, 2 threads, one model per process: 2-9 % faster in each of 4
// process pairs, ~20-30k fewer minor faults per step. A library cannot change its host's allocator
// (mallopt / a process-wide CPU allocator would), so these kernels take their outputs from here.
// Not pooled: convolution outputs, which oneDNN / ATen allocate themselves (torch offers no
// out= oneDNN convolution; the in-place overload over a zeroed or residual-filled pooled buffer
// was measured and did not pay: the extra pass costs what the faults cost).
//
// What it is:
// * Only tensors of at least kMinBytes (1 MiB) come from the pool; smaller ones use at::empty
//   (glibc keeps those, and the pool's bookkeeping would cost more than it saves).
// * A freed tensor's buffer returns to the pool through its DataPtr's deleter and is handed out
//   again for a later request of exactly the same byte size (ResNet shapes repeat, so exact
//   matching suffices and never wastes memory on a larger buffer). Pooled outputs must be
//   written entirely by their kernel: a recycled buffer holds an earlier tensor's values.
// * Bounded: at most FUSED_RESNET_CPU_POOL_MB MiB (default 1024) of idle buffers, at most
//   kMaxIdle of them; past either bound the least recently returned buffers are freed. Memory in
//   use by live tensors is not counted or limited (it belongs to the tensors).
//   `fused_resnet.backends.cpu_pool_stats()` reports the counters; `.empty_cpu_pool()` frees
//   every idle buffer (like torch.cuda.empty_cache).
// * FUSED_RESNET_CPU_POOL=0 (read per call) turns it off: outputs come from at::empty as before.
// * Thread safe: one mutex around the idle list; the deleter may run on any thread. The pool
//   object is never destroyed, so tensors freed during interpreter shutdown are safe.
// * The tensors are ordinary CPU tensors (any op, autograd, torch.save, numpy, share_memory_
//   work) except that their storage is not resizable: `out.resize_()` to a larger size raises
//   PyTorch's "Trying to resize storage that is not resizable".
// * Memory comes from c10::alloc_cpu (the same 64-byte aligned allocation torch uses).
#include <Python.h>

#include "cpu_kernels.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/MemoryFormat.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace fused_resnet {
namespace cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;
constexpr size_t kMaxIdle = 64;
constexpr size_t kDefaultLimitMiB = 1024;

struct Idle {
  void* ptr;
  size_t bytes;
  uint64_t tick;  // when it was returned (for least-recently-returned eviction)
};

class Pool {
 public:
  void* acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = idle_.size();
      for (size_t i = 0; i < idle_.size(); ++i) {
        // Exact size; the most recently returned one (warmest in cache and TLB).
        if (idle_[i].bytes == bytes && (best == idle_.size() || idle_[i].tick > idle_[best].tick)) best = i;
      }
      if (best != idle_.size()) {
        void* p = idle_[best].ptr;
        idle_bytes_ -= bytes;
        idle_[best] = idle_.back();
        idle_.pop_back();
        ++hits_;
        return p;
      }
      ++misses_;
    }
    return c10::alloc_cpu(bytes);
  }

  void release(void* p, size_t bytes) {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const size_t limit = limit_bytes();
      if (bytes > limit) {
        to_free.push_back(p);
      } else {
        idle_.push_back({p, bytes, ++tick_});
        idle_bytes_ += bytes;
        while (idle_bytes_ > limit || idle_.size() > kMaxIdle) {
          size_t oldest = 0;
          for (size_t i = 1; i < idle_.size(); ++i) {
            if (idle_[i].tick < idle_[oldest].tick) oldest = i;
          }
          to_free.push_back(idle_[oldest].ptr);
          idle_bytes_ -= idle_[oldest].bytes;
          idle_[oldest] = idle_.back();
          idle_.pop_back();
          ++evictions_;
        }
      }
    }
    for (void* q : to_free) c10::free_cpu(q);  // outside the lock
  }

  size_t empty() {
    std::vector<Idle> all;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      all.swap(idle_);
      idle_bytes_ = 0;
    }
    size_t freed = 0;
    for (const Idle& e : all) {
      c10::free_cpu(e.ptr);
      freed += e.bytes;
    }
    return freed;
  }

  struct Stats {
    size_t idle_bytes, idle_buffers, limit;
    uint64_t hits, misses, evictions;
  };
  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {idle_bytes_, idle_.size(), limit_bytes(), hits_, misses_, evictions_};
  }

  static size_t limit_bytes() {
    const char* v = std::getenv("FUSED_RESNET_CPU_POOL_MB");
    size_t mib = kDefaultLimitMiB;
    if (v != nullptr && *v != '\0') {
      char* end = nullptr;
      const long long parsed = std::strtoll(v, &end, 10);
      if (end != v && *end == '\0' && parsed >= 0) mib = static_cast<size_t>(parsed);
    }
    return mib << 20;
  }

 private:
  std::mutex mutex_;
  std::vector<Idle> idle_;
  size_t idle_bytes_ = 0;
  uint64_t tick_ = 0, hits_ = 0, misses_ = 0, evictions_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed (see the top)
  return *p;
}

bool pool_enabled() {
  const char* v = std::getenv("FUSED_RESNET_CPU_POOL");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

bool pool_serves(size_t bytes) { return bytes >= kMinBytes && pool_enabled(); }

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (!pool_serves(bytes)) return at::empty(sizes, options.memory_format(format));
  std::vector<int64_t> strides;
  if (format == at::MemoryFormat::ChannelsLast) {
    strides = c10::get_channels_last_strides_2d(sizes);
  } else {
    TORCH_INTERNAL_ASSERT(format == at::MemoryFormat::Contiguous);
    strides.assign(sizes.size(), 1);
    for (int64_t i = static_cast<int64_t>(sizes.size()) - 2; i >= 0; --i) strides[i] = strides[i + 1] * sizes[i + 1];
  }
  void* p = pool().acquire(bytes);
  return at::from_blob(
      p, sizes, strides, [bytes](void* q) { pool().release(q, bytes); }, options.memory_format(std::nullopt));
}

// Python: _C.cpu_pool_stats() -> dict; _C.cpu_pool_empty() -> int (bytes freed).
PyObject* cpu_pool_stats_py(PyObject*, PyObject*) {
  const auto s = pool().stats();
  return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:O}", "idle_bytes", (unsigned long long)s.idle_bytes,
                       "idle_buffers", (unsigned long long)s.idle_buffers, "limit_bytes",
                       (unsigned long long)s.limit, "hits", (unsigned long long)s.hits, "misses",
                       (unsigned long long)s.misses, "evictions", (unsigned long long)s.evictions, "enabled",
                       pool_enabled() ? Py_True : Py_False);
}

PyObject* cpu_pool_empty_py(PyObject*, PyObject*) {
  size_t freed = 0;
  Py_BEGIN_ALLOW_THREADS freed = pool().empty();
  Py_END_ALLOW_THREADS return PyLong_FromUnsignedLongLong(freed);
}

}  // namespace cpu
}  // namespace fused_resnet
