// masked_softmax on CUDA: softmax over the last dim of scores * scale (+ additive mask) with masked
// positions excluded, and its backward dX = scale * Y * (dY - sum(Y * dY)). The contract (shapes,
// mask kinds, lengths, causal codes) is in csrc/maskkern.cpp; the Python layer validates first.
//
// Row r = (b, h, i) reads only keys j < extent = min(lengths[b], the causal limit of i), 0 past
// query_lengths[b]; the rest of the row is written without being read. Two kernels per direction:
//   warp:  Lk <= 1024. A group of G <= 32 lanes per row (several rows per warp for short rows), the
//          row in registers, shuffle reductions: one read and one write of the row.
//   block: one block per row. The row is cached in shared memory when it takes at most half of what
//          a block may have (then it is read from global memory once); otherwise the first pass
//          keeps an online (max, sum) and the second pass reads the row again.
// Global loads and stores are 16 bytes wide where the row is aligned, elementwise otherwise (any Lk
// works); accumulation is in fp32 (fp64 for fp64); offsets are 64-bit.
//
// A row with nothing kept is all zeros: its max is -inf, the shift becomes 0 so every exp is 0, the
// sum is 0 and its reciprocal is taken as 0. fmax ignores NaN, so a kept NaN reaches the outputs
// through the sum (NaN, and so is every output of its row), as in eager PyTorch.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <type_traits>

#include "checks.h"
#include "common.cuh"

namespace maskkern {
namespace {

using at::Tensor;
using device::block_allreduce;
using device::group_allreduce;
using device::is_aligned;
using device::kWarpSize;
using device::load_pack;
using device::load_partial;
using device::MaxIgnoreNaN;
using device::store_pack;
using device::store_partial;

enum class MaskKind { kNone, kBool, kAdditive };

// Occupancy: a memory-bound kernel needs about 20 KB of loads in flight per SM to saturate an
// H100's HBM, and several resident blocks so that one block's reductions overlap another's loads.
// The block kernels use up to ~120 registers (no spills), so they stay at <= 256 threads to keep
// two or more blocks per SM. The warp kernels are not capped: capping them spills (ptxas -v).
constexpr int64_t kWarpMaxLk = 1024;  // rows up to this long are held in registers
constexpr int kWarpKernelThreads = 128;
constexpr int kBlockMinThreads = 128;
constexpr int kBlockMaxThreads = 256;
constexpr int kBlockPacksPerThread = 8;  // block size heuristic: about this many packs per thread
constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();  // grid.x; kernels loop

// Elements per 16-byte pack of T.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// Packs in flight per thread in the block kernels: 16 values (8 for fp64: twice the registers).
template <typename T>
constexpr int kBlockUnroll = std::min(16 / kVec<T>, 4);

template <typename T>
using acc_t = at::opmath_type<T>;

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// exp in the accumulation type. For 16-bit outputs __expf's few-ulp error is far below the output's
// rounding (2^-11 / 2^-8 relative); fp32 and fp64 outputs get the accurate expf / exp.
template <typename T>
__device__ __forceinline__ acc_t<T> row_exp(acc_t<T> x) {
  if constexpr (std::is_same_v<T, double>) {
    return ::exp(x);
  } else if constexpr (std::is_same_v<T, float>) {
    return ::expf(x);
  } else {
    return __expf(x);
  }
}

// What a row is shifted by before exp: its max, or 0 for a row with nothing kept (max -inf), where
// exp(-inf - -inf) would be NaN.
template <typename A>
__device__ __forceinline__ A safe_shift(A row_max) {
  return row_max == neg_inf<A>() ? A(0) : row_max;
}

// 1 / sum, and 0 for a row with nothing kept (sum 0); a NaN sum stays NaN.
template <typename A>
__device__ __forceinline__ A inverse_sum(A sum) {
  return sum == A(0) ? A(0) : A(1) / sum;
}

// Online softmax state of part of a row: its max and sum(exp(z - safe_shift(max))).
template <typename A>
struct MaxSum {
  A max, sum;
};

template <typename A>
__device__ __forceinline__ MaxSum<A> shfl_xor(MaxSum<A> v, int offset) {
  return {device::shfl_xor(v.max, offset), device::shfl_xor(v.sum, offset)};
}

template <typename T>
struct MergeOp {
  __device__ __forceinline__ MaxSum<acc_t<T>> operator()(MaxSum<acc_t<T>> a,
                                                         MaxSum<acc_t<T>> b) const {
    const acc_t<T> max = MaxIgnoreNaN{}(a.max, b.max);
    const acc_t<T> shift = safe_shift(max);
    return {max, a.sum * row_exp<T>(a.max - shift) + b.sum * row_exp<T>(b.max - shift)};
  }
};

// Which keys a row reads: j < extent(b, i). lengths / query_lengths: int64 (B,) or null.
struct RowKeys {
  const int64_t* lengths;
  const int64_t* query_lengths;
  int64_t H, Lq, Lk;
  int causal;  // 0 none, 1 top-left (j <= i), 2 bottom-right (j <= i + Lk - Lq)

  __device__ __forceinline__ int64_t extent(int64_t b, int64_t i) const {
    if (query_lengths != nullptr && i >= query_lengths[b]) return 0;
    int64_t end = Lk;
    if (lengths != nullptr) end = ::min(end, lengths[b]);
    if (causal == 1) end = ::min(end, i + 1);
    if (causal == 2) end = ::min(end, i + 1 + Lk - Lq);
    return ::max(end, int64_t{0});
  }
};

// Block kernels' dynamic shared memory: the reduction buffer, then (cached kernels) the row.
constexpr size_t kReduceBytes = kWarpSize * sizeof(MaxSum<double>);

// --- forward -------------------------------------------------------------------------------------

template <typename T, MaskKind K>
using mask_t = std::conditional_t<K == MaskKind::kBool, uint8_t, T>;

template <typename T, MaskKind K>
struct FwdParams {
  const T* scores;  // (rows, Lk) contiguous
  T* out;           // (rows, Lk) contiguous
  const mask_t<T, K>* mask;
  int64_t mask_stride[4];  // of the (B, H, Lq, Lk) mask view, in elements (0 where broadcast)
  RowKeys keys;
  int64_t rows;
  acc_t<T> scale;
};

// The raw contents of one pack of a forward row: scores and mask values as stored.
template <typename T, MaskKind K>
struct FwdRaw {
  T x[kVec<T>];
  mask_t<T, K> m[kVec<T>];
};

// One row of the forward: where it is read and written, and how many keys are read. Loading is
// split in fetch (loads only) and scaled (arithmetic) so that a thread's loads are all in flight
// before the first of them is waited for.
template <typename T, MaskKind K>
struct FwdRow {
  const T* x;
  T* y;
  const mask_t<T, K>* m = nullptr;
  int64_t extent;
  bool x_packed, y_packed, m_packed = false;

  __device__ __forceinline__ FwdRow(const FwdParams<T, K>& p, int64_t row) {
    const RowKeys& k = p.keys;
    const int64_t i = row % k.Lq;
    const int64_t b = row / k.Lq / k.H;
    x = p.scores + row * k.Lk;
    y = p.out + row * k.Lk;
    extent = k.extent(b, i);
    x_packed = is_aligned<kVec<T>>(x);
    y_packed = is_aligned<kVec<T>>(y);
    if constexpr (K != MaskKind::kNone) {
      const int64_t h = row / k.Lq % k.H;
      const int64_t* s = p.mask_stride;
      m = p.mask + b * s[0] + h * s[1] + i * s[2];
      m_packed = s[3] == 1 && is_aligned<kVec<T>>(m);
    }
  }

  // Keys j0 .. j0 + kVec - 1 (j0 a multiple of kVec) as stored; keys j >= extent are not read
  // (zeros).
  __device__ __forceinline__ void fetch(const FwdParams<T, K>& p, int64_t j0,
                                        FwdRaw<T, K>& raw) const {
    constexpr int V = kVec<T>;
    using M = mask_t<T, K>;
    load_partial<V>(x, x_packed, j0, extent, raw.x, T(0));
    if constexpr (K != MaskKind::kNone) {
      const int64_t ms = p.mask_stride[3];
      if (ms == 1) {
        load_partial<V>(m, m_packed, j0, extent, raw.m, M(0));
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) raw.m[v] = j0 + v < extent ? m[(j0 + v) * ms] : M(0);
      }
    }
  }

  // z = x * scale (+ additive) of a fetched pack; -inf where masked and for keys j >= extent.
  __device__ __forceinline__ void scaled(const FwdParams<T, K>& p, int64_t j0,
                                         const FwdRaw<T, K>& raw, acc_t<T> (&z)[kVec<T>]) const {
    using A = acc_t<T>;
#pragma unroll
    for (int v = 0; v < kVec<T>; ++v) {
      A t = static_cast<A>(raw.x[v]) * p.scale;
      if constexpr (K == MaskKind::kAdditive) t += static_cast<A>(raw.m[v]);
      bool keep = j0 + v < extent;
      if constexpr (K == MaskKind::kBool) keep = keep && raw.m[v] != 0;
      z[v] = keep ? t : neg_inf<A>();
    }
  }

  // Writes e * inv for keys j0 .. min(j0 + kVec, Lk) - 1.
  __device__ __forceinline__ void store(int64_t Lk, int64_t j0, const acc_t<T> (&e)[kVec<T>],
                                        acc_t<T> inv) const {
    acc_t<T> o[kVec<T>];
#pragma unroll
    for (int v = 0; v < kVec<T>; ++v) o[v] = e[v] * inv;
    store_partial<kVec<T>>(y, y_packed, j0, Lk, o);
  }
};

// Rows of Lk <= group * CHUNKS * kVec: `group` lanes (a power of two <= 32) per row, blockDim.x /
// group rows per block; lane l of a group holds packs l, l + group, ... of its row.
template <typename T, MaskKind K, int CHUNKS>
__global__ void __launch_bounds__(kWarpKernelThreads)
    masked_softmax_fwd_warp(const FwdParams<T, K> p, const int group) {
  constexpr int V = kVec<T>;
  using A = acc_t<T>;
  const int lane = threadIdx.x % group;
  const int rows_per_block = blockDim.x / group;
  // The loop bound is uniform over the block so that every lane reaches every shuffle; lanes past
  // the last row take part with extent = 0 and store nothing.
  for (int64_t first = int64_t{blockIdx.x} * rows_per_block; first < p.rows;
       first += int64_t{gridDim.x} * rows_per_block) {
    const int64_t row = first + threadIdx.x / group;
    const bool active = row < p.rows;
    FwdRow<T, K> r(p, active ? row : first);
    if (!active) r.extent = 0;
    FwdRaw<T, K> raw[CHUNKS];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) r.fetch(p, int64_t{c * group + lane} * V, raw[c]);
    A z[CHUNKS][V];
    A max = neg_inf<A>();
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      r.scaled(p, int64_t{c * group + lane} * V, raw[c], z[c]);
#pragma unroll
      for (int v = 0; v < V; ++v) max = MaxIgnoreNaN{}(max, z[c][v]);
    }
    const A shift = safe_shift(group_allreduce(max, group, MaxIgnoreNaN{}));
    A sum = 0;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        z[c][v] = row_exp<T>(z[c][v] - shift);
        sum += z[c][v];
      }
    }
    const A inv = inverse_sum(group_allreduce(sum, group, device::Sum{}));
    if (active) {
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        const int64_t j0 = int64_t{c * group + lane} * V;
        if (j0 < p.keys.Lk) r.store(p.keys.Lk, j0, z[c], inv);
      }
    }
  }
}

// One block per row; thread t owns packs t, t + blockDim.x, ... of the row in every pass, so the
// cache needs no synchronisation beyond the reductions'. CACHED: pack c of the row's z, then of its
// exps, lives at cache + c * kVec.
template <typename T, MaskKind K, bool CACHED>
__global__ void __launch_bounds__(kBlockMaxThreads)
    masked_softmax_fwd_block(const FwdParams<T, K> p) {
  constexpr int V = kVec<T>;
  constexpr int U = kBlockUnroll<T>;
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  auto* red = reinterpret_cast<MaxSum<A>*>(smem);
  A* cache = reinterpret_cast<A*>(smem + kReduceBytes);
  const int64_t Lk = p.keys.Lk;
  const int64_t stride = blockDim.x;
  const int64_t packs = (Lk + V - 1) / V;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const FwdRow<T, K> r(p, row);
    const int64_t packs_read = (r.extent + V - 1) / V;
    MaxSum<A> part{neg_inf<A>(), A(0)};
    for (int64_t c0 = threadIdx.x; c0 < packs_read; c0 += U * stride) {
      FwdRaw<T, K> raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) r.fetch(p, (c0 + u * stride) * V, raw[u]);
      A z[U][V];
      A max = part.max;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        r.scaled(p, (c0 + u * stride) * V, raw[u], z[u]);  // past extent: -inf
#pragma unroll
        for (int v = 0; v < V; ++v) max = MaxIgnoreNaN{}(max, z[u][v]);
      }
      if constexpr (CACHED) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (c0 + u * stride < packs_read) store_pack<V>(cache + (c0 + u * stride) * V, z[u]);
        }
        part.max = max;
      } else {
        const A shift = safe_shift(max);
        A sum = part.sum * row_exp<T>(part.max - shift);
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
          for (int v = 0; v < V; ++v) sum += row_exp<T>(z[u][v] - shift);
        }
        part = {max, sum};
      }
    }
    A shift, inv;
    if constexpr (CACHED) {
      shift = safe_shift(block_allreduce(part.max, reinterpret_cast<A*>(red), MaxIgnoreNaN{}));
      A sum = 0;
      for (int64_t c = threadIdx.x; c < packs_read; c += stride) {
        A e[V];
        load_pack<V>(cache + c * V, e);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          e[v] = row_exp<T>(e[v] - shift);
          sum += e[v];
        }
        store_pack<V>(cache + c * V, e);
      }
      inv = inverse_sum(block_allreduce(sum, reinterpret_cast<A*>(red), device::Sum{}));
    } else {
      const MaxSum<A> total = block_allreduce(part, red, MergeOp<T>{});
      shift = safe_shift(total.max);
      inv = inverse_sum(total.sum);
    }
    // The whole row is written; keys past extent get exp(-inf) * inv = 0.
    for (int64_t c0 = threadIdx.x; c0 < packs; c0 += U * stride) {
      FwdRaw<T, K> raw[U];
      if constexpr (!CACHED) {
#pragma unroll
        for (int u = 0; u < U; ++u) r.fetch(p, (c0 + u * stride) * V, raw[u]);
      }
      A e[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * stride;
        if constexpr (CACHED) {
          if (c < packs_read) {
            load_pack<V>(cache + c * V, e[u]);
          } else {
#pragma unroll
            for (int v = 0; v < V; ++v) e[u][v] = A(0);
          }
        } else {
          r.scaled(p, c * V, raw[u], e[u]);
#pragma unroll
          for (int v = 0; v < V; ++v) e[u][v] = row_exp<T>(e[u][v] - shift);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c0 + u * stride < packs) r.store(Lk, (c0 + u * stride) * V, e[u], inv);
      }
    }
  }
}

// --- backward ------------------------------------------------------------------------------------

template <typename T>
struct BwdParams {
  const T* grad;  // (rows, Lk) contiguous: dY
  const T* out;   // (rows, Lk) contiguous: Y
  T* dx;          // (rows, Lk) contiguous
  RowKeys keys;
  int64_t rows;
  acc_t<T> scale;
};

// The raw contents of one pack of a backward row (also its shared-memory cache entry).
template <typename T>
struct BwdRaw {
  device::Pack<T, kVec<T>> y, g;
};

// One row of the backward; keys j >= extent have Y = 0 and are not read.
template <typename T>
struct BwdRow {
  const T* g;
  const T* y;
  T* dx;
  int64_t extent;
  bool g_packed, y_packed, dx_packed;

  __device__ __forceinline__ BwdRow(const BwdParams<T>& p, int64_t row) {
    const RowKeys& k = p.keys;
    g = p.grad + row * k.Lk;
    y = p.out + row * k.Lk;
    dx = p.dx + row * k.Lk;
    extent = k.extent(row / k.Lq / k.H, row % k.Lq);
    g_packed = is_aligned<kVec<T>>(g);
    y_packed = is_aligned<kVec<T>>(y);
    dx_packed = is_aligned<kVec<T>>(dx);
  }

  // Y and dY for keys j0 .. j0 + kVec - 1 as stored; zeros for j >= extent, which are not read.
  __device__ __forceinline__ void fetch(int64_t j0, BwdRaw<T>& raw) const {
    load_partial<kVec<T>>(y, y_packed, j0, extent, raw.y.v, T(0));
    load_partial<kVec<T>>(g, g_packed, j0, extent, raw.g.v, T(0));
  }

  // dX = scale * Y * (dY - dot) for keys j0 .. min(j0 + kVec, Lk) - 1.
  __device__ __forceinline__ void store(const BwdParams<T>& p, int64_t j0, const BwdRaw<T>& raw,
                                        acc_t<T> dot) const {
    using A = acc_t<T>;
    A d[kVec<T>];
#pragma unroll
    for (int v = 0; v < kVec<T>; ++v) {
      d[v] = p.scale * static_cast<A>(raw.y.v[v]) * (static_cast<A>(raw.g.v[v]) - dot);
    }
    store_partial<kVec<T>>(dx, dx_packed, j0, p.keys.Lk, d);
  }
};

// sum(Y * dY) over a fetched pack.
template <typename T>
__device__ __forceinline__ acc_t<T> pack_dot(const BwdRaw<T>& raw) {
  acc_t<T> dot = 0;
#pragma unroll
  for (int v = 0; v < kVec<T>; ++v) {
    dot += static_cast<acc_t<T>>(raw.y.v[v]) * static_cast<acc_t<T>>(raw.g.v[v]);
  }
  return dot;
}

// The layout of masked_softmax_fwd_warp.
template <typename T, int CHUNKS>
__global__ void __launch_bounds__(kWarpKernelThreads)
    masked_softmax_bwd_warp(const BwdParams<T> p, const int group) {
  constexpr int V = kVec<T>;
  using A = acc_t<T>;
  const int lane = threadIdx.x % group;
  const int rows_per_block = blockDim.x / group;
  for (int64_t first = int64_t{blockIdx.x} * rows_per_block; first < p.rows;
       first += int64_t{gridDim.x} * rows_per_block) {
    const int64_t row = first + threadIdx.x / group;
    const bool active = row < p.rows;
    BwdRow<T> r(p, active ? row : first);
    if (!active) r.extent = 0;
    BwdRaw<T> raw[CHUNKS];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) r.fetch(int64_t{c * group + lane} * V, raw[c]);
    A dot = 0;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) dot += pack_dot(raw[c]);
    dot = group_allreduce(dot, group, device::Sum{});
    if (active) {
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        const int64_t j0 = int64_t{c * group + lane} * V;
        if (j0 < p.keys.Lk) r.store(p, j0, raw[c], dot);
      }
    }
  }
}

// The layout of masked_softmax_fwd_block. CACHED: pack c of the row, as stored, at cache[c].
template <typename T, bool CACHED>
__global__ void __launch_bounds__(kBlockMaxThreads) masked_softmax_bwd_block(const BwdParams<T> p) {
  constexpr int V = kVec<T>;
  constexpr int U = kBlockUnroll<T>;
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  A* red = reinterpret_cast<A*>(smem);
  auto* cache = reinterpret_cast<BwdRaw<T>*>(smem + kReduceBytes);
  const int64_t stride = blockDim.x;
  const int64_t packs = (p.keys.Lk + V - 1) / V;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const BwdRow<T> r(p, row);
    const int64_t packs_read = (r.extent + V - 1) / V;
    A dot = 0;
    for (int64_t c0 = threadIdx.x; c0 < packs_read; c0 += U * stride) {
      BwdRaw<T> raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) r.fetch((c0 + u * stride) * V, raw[u]);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (CACHED && c0 + u * stride < packs_read) cache[c0 + u * stride] = raw[u];
        dot += pack_dot(raw[u]);
      }
    }
    dot = block_allreduce(dot, red, device::Sum{});
    for (int64_t c0 = threadIdx.x; c0 < packs; c0 += U * stride) {
      BwdRaw<T> raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * stride;
        if (CACHED && c < packs_read) {
          raw[u] = cache[c];
        } else {
          r.fetch(c * V, raw[u]);  // past extent: zeros, not read
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c0 + u * stride < packs) r.store(p, (c0 + u * stride) * V, raw[u], dot);
      }
    }
  }
}

// --- launchers -----------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int next_pow2(int64_t x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

// Calls launch(std::integral_constant<int, CHUNKS>) with the smallest power of two CHUNKS for which
// a warp holds `packs` packs (CHUNKS per lane); needs packs * kVec <= kWarpMaxLk.
template <typename T, int CHUNKS = 1, typename Launch>
void with_warp_chunks(int64_t packs, const Launch& launch) {
  if constexpr (int64_t{CHUNKS} * kWarpSize * kVec<T> < kWarpMaxLk) {
    if (packs > CHUNKS * kWarpSize) return with_warp_chunks<T, 2 * CHUNKS>(packs, launch);
  }
  launch(std::integral_constant<int, CHUNKS>{});
}

struct WarpGrid {
  int group;  // lanes per row
  unsigned blocks;
};

WarpGrid warp_grid(int64_t rows, int64_t packs, int chunks) {
  const int group = chunks > 1 ? kWarpSize : next_pow2(packs);
  const int64_t blocks = ceil_div(rows, kWarpKernelThreads / group);
  return {group, static_cast<unsigned>(std::min(blocks, kMaxBlocks))};
}

// Threads per block for one row of `packs` packs.
int block_threads(int64_t packs) {
  return std::clamp(next_pow2(ceil_div(packs, kBlockPacksPerThread)), kBlockMinThreads,
                    kBlockMaxThreads);
}

// The most dynamic shared memory a cached block kernel may use: two such blocks stay resident per
// SM, each with the runtime's own per-block reserve beside it (1 KB on sm_90).
size_t cached_smem_cap() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return std::min(prop->sharedMemPerBlockOptin,
                  prop->sharedMemPerMultiprocessor / 2 - prop->reservedSharedMemPerBlock);
}

// Bytes of dynamic shared memory for a block kernel that caches `pack_bytes` per pack of the row,
// or 0 (run the looped kernel) when that is over cached_smem_cap().
size_t cached_smem_bytes(int64_t packs, size_t pack_bytes) {
  const size_t bytes = kReduceBytes + packs * pack_bytes;
  return bytes <= cached_smem_cap() ? bytes : 0;
}

template <typename Params>
void launch_block(void (*kernel)(Params), const Params& p, int threads, size_t smem,
                  cudaStream_t stream) {
  if (smem > 48 * 1024) {  // the default limit; more needs an opt-in per kernel
    // The cap, not this launch's size: the attribute is per kernel for the whole process, and a
    // smaller size set by another host thread between this set and this launch would fail it.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(cached_smem_cap())));
  }
  const auto blocks = static_cast<unsigned>(std::min(p.rows, kMaxBlocks));
  kernel<<<blocks, threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

RowKeys row_keys(const Tensor& x, const std::optional<Tensor>& lengths,
                 const std::optional<Tensor>& query_lengths, int64_t causal) {
  return {lengths ? lengths->const_data_ptr<int64_t>() : nullptr,
          query_lengths ? query_lengths->const_data_ptr<int64_t>() : nullptr,
          x.size(1),
          x.size(2),
          x.size(3),
          static_cast<int>(causal)};
}

template <typename T, MaskKind K>
void launch_fwd(const Tensor& scores, const std::optional<Tensor>& mask, const RowKeys& keys,
                double scale, Tensor& out) {
  FwdParams<T, K> p{};
  p.scores = scores.const_data_ptr<T>();
  p.out = out.mutable_data_ptr<T>();
  if constexpr (K != MaskKind::kNone) {
    p.mask = static_cast<const mask_t<T, K>*>(mask->const_data_ptr());
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = mask->stride(d);
  }
  p.keys = keys;
  p.rows = scores.numel() / keys.Lk;
  p.scale = static_cast<acc_t<T>>(scale);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t packs = ceil_div(keys.Lk, kVec<T>);
  if (keys.Lk <= kWarpMaxLk) {
    with_warp_chunks<T>(packs, [&](auto chunks) {
      constexpr int C = decltype(chunks)::value;
      const WarpGrid g = warp_grid(p.rows, packs, C);
      masked_softmax_fwd_warp<T, K, C><<<g.blocks, kWarpKernelThreads, 0, stream>>>(p, g.group);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else if (const size_t smem = cached_smem_bytes(packs, kVec<T> * sizeof(acc_t<T>))) {
    launch_block(masked_softmax_fwd_block<T, K, true>, p, block_threads(packs), smem, stream);
  } else {
    launch_block(masked_softmax_fwd_block<T, K, false>, p, block_threads(packs), kReduceBytes,
                 stream);
  }
}

template <typename T>
void launch_bwd(const Tensor& grad, const Tensor& out, const RowKeys& keys, double scale,
                Tensor& dx) {
  BwdParams<T> p{};
  p.grad = grad.const_data_ptr<T>();
  p.out = out.const_data_ptr<T>();
  p.dx = dx.mutable_data_ptr<T>();
  p.keys = keys;
  p.rows = out.numel() / keys.Lk;
  p.scale = static_cast<acc_t<T>>(scale);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t packs = ceil_div(keys.Lk, kVec<T>);
  if (keys.Lk <= kWarpMaxLk) {
    with_warp_chunks<T>(packs, [&](auto chunks) {
      constexpr int C = decltype(chunks)::value;
      const WarpGrid g = warp_grid(p.rows, packs, C);
      masked_softmax_bwd_warp<T, C><<<g.blocks, kWarpKernelThreads, 0, stream>>>(p, g.group);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else if (const size_t smem = cached_smem_bytes(packs, sizeof(BwdRaw<T>))) {
    launch_block(masked_softmax_bwd_block<T, true>, p, block_threads(packs), smem, stream);
  } else {
    launch_block(masked_softmax_bwd_block<T, false>, p, block_threads(packs), kReduceBytes, stream);
  }
}

// --- ops -----------------------------------------------------------------------------------------

// The lengths as the kernels index them: contiguous (checks.h has asserted int64 (B,)).
std::optional<Tensor> contiguous(const std::optional<Tensor>& t) {
  return t ? std::optional<Tensor>(t->contiguous()) : std::nullopt;
}

Tensor masked_softmax_fwd_cuda(const Tensor& scores_in, const std::optional<Tensor>& mask,
                               const std::optional<Tensor>& lengths_in,
                               const std::optional<Tensor>& query_lengths_in, int64_t causal,
                               double scale) {
  checks::masked_softmax_fwd(scores_in, mask, lengths_in, query_lengths_in, causal);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const Tensor scores = scores_in.contiguous();
  const auto lengths = contiguous(lengths_in), query_lengths = contiguous(query_lengths_in);
  Tensor out = at::empty_like(scores, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const RowKeys keys = row_keys(scores, lengths, query_lengths, causal);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, scores.scalar_type(), "masked_softmax_fwd_cuda", [&] {
        if (!mask) {
          launch_fwd<scalar_t, MaskKind::kNone>(scores, mask, keys, scale, out);
        } else if (mask->scalar_type() == at::kBool) {
          launch_fwd<scalar_t, MaskKind::kBool>(scores, mask, keys, scale, out);
        } else {
          launch_fwd<scalar_t, MaskKind::kAdditive>(scores, mask, keys, scale, out);
        }
      });
  return out;
}

// mask: only asserted (the CUDA kernel reads each row up to its extent from lengths / causal).
Tensor masked_softmax_bwd_cuda(const Tensor& grad_in, const Tensor& out_in,
                               const std::optional<Tensor>& mask,
                               const std::optional<Tensor>& lengths_in,
                               const std::optional<Tensor>& query_lengths_in, int64_t causal,
                               double scale) {
  checks::masked_softmax_bwd(grad_in, out_in, mask, lengths_in, query_lengths_in, causal);
  const c10::cuda::CUDAGuard guard(out_in.device());
  const Tensor grad = grad_in.contiguous();
  const Tensor out = out_in.contiguous();
  const auto lengths = contiguous(lengths_in), query_lengths = contiguous(query_lengths_in);
  Tensor dx = at::empty_like(out, at::MemoryFormat::Contiguous);
  if (dx.numel() == 0) return dx;
  const RowKeys keys = row_keys(out, lengths, query_lengths, causal);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(),
                                  "masked_softmax_bwd_cuda",
                                  [&] { launch_bwd<scalar_t>(grad, out, keys, scale, dx); });
  return dx;
}

}  // namespace
}  // namespace maskkern

TORCH_LIBRARY_IMPL(maskkern, CUDA, m) {
  m.impl("masked_softmax_fwd", &maskkern::masked_softmax_fwd_cuda);
  m.impl("masked_softmax_bwd", &maskkern::masked_softmax_bwd_cuda);
}
