// The key of a pre-packed weight cache entry: which memory the weight is (its StorageImpl and
// storage offset). Shared by csrc/cpu/onednn.cpp (oneDNN-packed folded weights) and
// csrc/cuda/ops_cuda.cpp (igemm's channels_last weight copies); each cache pins the storage with
// a weak reference and validates everything else (data pointer, sizes, strides, version, ...)
// in its own entry.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>

namespace fused_resnet {

struct StorageKey {
  const void* storage;
  int64_t offset;

  static StorageKey of(const at::Tensor& t) { return {t.storage().unsafeGetStorageImpl(), t.storage_offset()}; }
  bool operator==(const StorageKey& o) const { return storage == o.storage && offset == o.offset; }
};

struct StorageKeyHash {
  size_t operator()(const StorageKey& k) const {
    return std::hash<const void*>()(k.storage) ^ (std::hash<int64_t>()(k.offset) * 0x9E3779B97F4A7C15ull);
  }
};

}  // namespace fused_resnet
