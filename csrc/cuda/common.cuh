// Device helpers shared by maskkern's CUDA kernels: packed (vectorised) memory access and warp /
// block all-reductions. Header-only; everything is inline.
#pragma once

#include <cstdint>

namespace maskkern::device {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// N contiguous elements moved by one instruction (16 bytes for the float types) when the address
// is aligned to the pack's size; callers check with is_aligned and fall back to scalar access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<std::uintptr_t>(p) % sizeof(Pack<T, N>) == 0;
}

template <int N, typename T, typename U>
__device__ __forceinline__ void load_pack(const T* p, U (&dst)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) dst[k] = static_cast<U>(pack.v[k]);
}

template <int N, typename T, typename U>
__device__ __forceinline__ void store_pack(T* p, const U (&src)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int k = 0; k < N; ++k) pack.v[k] = static_cast<T>(src[k]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// Elements j0 .. j0 + N - 1 of a row of `len` elements at p; elements at or past `len` are not read
// and come back as `fill`. `packed`: p is aligned for Pack<T, N> and j0 is a multiple of N.
template <int N, typename T, typename U>
__device__ __forceinline__ void load_partial(const T* p, bool packed, int64_t j0, int64_t len,
                                             U (&dst)[N], U fill) {
  if (packed && j0 + N <= len) {
    load_pack<N>(p + j0, dst);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) dst[k] = j0 + k < len ? static_cast<U>(p[j0 + k]) : fill;
  }
}

// Writes elements j0 .. min(j0 + N, len) - 1 of a row; `packed` as for load_partial.
template <int N, typename T, typename U>
__device__ __forceinline__ void store_partial(T* p, bool packed, int64_t j0, int64_t len,
                                              const U (&src)[N]) {
  if (packed && j0 + N <= len) {
    store_pack<N>(p + j0, src);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (j0 + k < len) p[j0 + k] = static_cast<T>(src[k]);
    }
  }
}

// The sum of two partials, for group_allreduce / block_allreduce.
struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

// The max of two partials that keeps a NaN (either one's), as eager's max and log_softmax do.
struct MaxKeepNaN {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return (a != a || a > b) ? a : b;
  }
};

// The max of two partials that ignores a NaN (fmax): the other one wins.
struct MaxIgnoreNaN {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return ::fmax(a, b);
  }
};

// Overloaded (found by argument-dependent lookup) for kernels' own reduction types.
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int offset) {
  return __shfl_xor_sync(kFullMask, v, offset);
}

// Butterfly all-reduce within aligned groups of `width` lanes (a power of two <= 32): every lane of
// a group ends with the group's result, bit-identical across the group when `op` is commutative.
// The whole warp must call it (full shuffle mask), including lanes with nothing to contribute.
template <typename T, typename Op>
__device__ __forceinline__ T group_allreduce(T v, int width, Op op) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) v = op(v, shfl_xor(v, offset));
  return v;
}

// All-reduce over the block (blockDim.x a multiple of 32); `buf` is shared memory for kWarpSize
// values. Every thread of the block must call it; it returns the same value to all of them.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, T* buf, Op op) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = group_allreduce(v, kWarpSize, op);
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  v = buf[0];
  for (int w = 1; w < static_cast<int>(blockDim.x) / kWarpSize; ++w) v = op(v, buf[w]);
  __syncthreads();  // the caller's next reduction may overwrite buf
  return v;
}

}  // namespace maskkern::device
