#pragma once
// One resident wave of a kernel on the current device (SMs x blocks per SM at the kernel's occupancy
// for a block size), for launchers that size a grid-stride grid to it. Both numbers are fixed for
// the life of the process, so they are queried on the first launch on each device and cached: later
// launches make one cudaGetDevice call and no attribute or occupancy query.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace fastbert::cuda {

constexpr int kMaxCachedDevices = 64;  // devices with a higher ordinal are queried on every launch

// Kernel: the __global__ function (each template instance has its own cache); Threads: block size.
// Thread-safe without a lock: a cache slot only ever goes from 0 (not computed) to the device's
// value, and threads racing on the first launch compute and store that same value.
template <auto Kernel, int Threads>
cudaError_t resident_wave(int64_t* wave) {
  static std::atomic<int64_t> cache[kMaxCachedDevices];  // static storage: zero-initialised
  int dev = 0;
  if (const cudaError_t err = cudaGetDevice(&dev)) return err;
  const bool cached = dev >= 0 && dev < kMaxCachedDevices;
  if (cached) {
    if (const int64_t w = cache[dev].load(std::memory_order_relaxed); w > 0) {
      *wave = w;
      return cudaSuccess;
    }
  }
  int sms = 0, per_sm = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (!err) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, Threads, 0);
  if (err) return err;
  const int64_t w = int64_t{sms > 0 ? sms : 1} * (per_sm > 0 ? per_sm : 1);
  if (cached) cache[dev].store(w, std::memory_order_relaxed);
  *wave = w;
  return cudaSuccess;
}

}  // namespace fastbert::cuda
