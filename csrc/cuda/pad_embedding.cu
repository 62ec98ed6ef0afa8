// pad_embedding on CUDA: a row gather forward and a deterministic dense backward. The contract
// (shapes, pad = -1 for none, out-of-range ids) is in csrc/maskkern.cpp; the Python layer
// validates first, and these kernels never read or write out of bounds whatever the ids.
//
// Both kernels give a row to a group of TPR threads (a power of two, up to the block) that walk it
// in 16-byte packs where the rows are aligned, elementwise otherwise; short rows put several groups
// in a block. Offsets are 64-bit.
//
// Forward: row n is weight[ids[n]] copied as it is (bit-exact), or multiplied by the scale in fp32
// (fp64 for fp64) and rounded once, as eager does; zero_pad pads and out-of-range ids are written
// as zeros without reading the weight.
//
// Backward: at::sort (stable) of the ids, with pad and out-of-range ids keyed past the last row,
// orders the tokens by id and keeps a row's tokens in token order; a binary search gives each row
// its segment. One group per row then sums its tokens' grad rows in fp32 (fp64) in that order —
// several loads in flight, added in sequence — and writes the row once (zeros for a row without
// tokens). No atomics: the same bits on every run, equal to the CPU kernel's.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "checks.h"
#include "common.cuh"

namespace maskkern {
namespace {

using at::Tensor;
using device::is_aligned;
using device::load_partial;
using device::store_partial;

template <typename T>
using acc_t = at::opmath_type<T>;

// Elements per 16-byte pack of T.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

constexpr int kThreads = 256;
constexpr int kLoadsInFlight = 4;  // backward: grad rows loaded before they are added in order
constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();  // grid.x; kernels loop

// Row r of `rows` goes to thread group r % rows_per_block of block r / rows_per_block, looping
// with the grid's stride when there are more rows than the grid holds.
struct RowGroups {
  int threads_per_row;  // TPR: a power of two <= kThreads
  int rows_per_block;   // kThreads / TPR
};

RowGroups row_groups(int64_t packs) {
  int tpr = 1;
  while (tpr < packs && tpr < kThreads) tpr *= 2;
  return {tpr, kThreads / tpr};
}

unsigned grid_blocks(int64_t rows, const RowGroups& g) {
  return static_cast<unsigned>(
      std::min((rows + g.rows_per_block - 1) / g.rows_per_block, kMaxBlocks));
}

bool host_aligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// --- forward -------------------------------------------------------------------------------------

template <typename T, typename index_t>
struct FwdParams {
  T* out;              // (N, D) contiguous
  const index_t* ids;  // (N,)
  const T* weight;     // (V, D), rows stride_w apart, unit column stride
  int64_t stride_w;
  int64_t N, V, D;
  int64_t pad;    // -1 for none
  bool zero_pad;  // pads give zeros without reading the weight
  bool scaled;    // scale != 1
  acc_t<T> scale;
  bool packed;  // every weight row and out row starts 16-byte aligned
  RowGroups groups;
};

template <typename T, typename index_t>
__global__ void pad_embedding_fwd_kernel(const FwdParams<T, index_t> p) {
  constexpr int N = kVec<T>;
  const int tpr = p.groups.threads_per_row;
  const int64_t lane = threadIdx.x % tpr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * p.groups.rows_per_block;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * p.groups.rows_per_block + threadIdx.x / tpr;
       n < p.N; n += stride) {
    const int64_t id = static_cast<int64_t>(p.ids[n]);
    T* dst = p.out + n * p.D;
    if (id < 0 || id >= p.V || (p.zero_pad && id == p.pad)) {
      T zeros[N];
#pragma unroll
      for (int k = 0; k < N; ++k) zeros[k] = T{};
      for (int64_t j0 = lane * N; j0 < p.D; j0 += tpr * N)
        store_partial(dst, p.packed, j0, p.D, zeros);
      continue;
    }
    const T* src = p.weight + id * p.stride_w;
    for (int64_t j0 = lane * N; j0 < p.D; j0 += tpr * N) {
      if (p.scaled) {
        acc_t<T> v[N];
        load_partial(src, p.packed, j0, p.D, v, acc_t<T>(0));
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] *= p.scale;
        store_partial(dst, p.packed, j0, p.D, v);
      } else {
        T v[N];
        load_partial(src, p.packed, j0, p.D, v, T{});
        store_partial(dst, p.packed, j0, p.D, v);
      }
    }
  }
}

Tensor pad_embedding_fwd_cuda(const Tensor& ids_in, const Tensor& weight, int64_t pad,
                              bool zero_pad, double scale) {
  checks::pad_embedding_fwd(ids_in, weight);
  const c10::cuda::CUDAGuard guard(weight.device());
  const Tensor ids = ids_in.contiguous();
  const int64_t N = ids.size(0), V = weight.size(0), D = weight.size(1);
  Tensor out = at::empty({N, D}, weight.options());
  if (N == 0 || D == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "pad_embedding_fwd_cuda", [&] {
        AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "pad_embedding_fwd_cuda", [&] {
          constexpr int N_ = kVec<scalar_t>;
          FwdParams<scalar_t, index_t> p{};
          p.out = out.mutable_data_ptr<scalar_t>();
          p.ids = ids.const_data_ptr<index_t>();
          p.weight = weight.const_data_ptr<scalar_t>();
          p.stride_w = weight.stride(0);
          p.N = N;
          p.V = V;
          p.D = D;
          p.pad = pad;
          p.zero_pad = zero_pad;
          p.scaled = scale != 1.0;
          p.scale = static_cast<acc_t<scalar_t>>(scale);
          p.packed =
              host_aligned(p.weight) && host_aligned(p.out) && p.stride_w % N_ == 0 && D % N_ == 0;
          p.groups = row_groups((D + N_ - 1) / N_);
          pad_embedding_fwd_kernel<<<grid_blocks(N, p.groups), kThreads, 0, stream>>>(p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return out;
}

// --- backward ------------------------------------------------------------------------------------

template <typename T>
struct BwdParams {
  T* grad_weight;         // (V, D) contiguous
  const T* grad;          // (N, D) contiguous
  const int64_t* order;   // (N,) token positions sorted by id, uncounted ones last
  const int64_t* starts;  // (V + 1,) row r's tokens: order[starts[r] .. starts[r + 1])
  int64_t V, D;
  double scale;
  bool freq;    // scale_grad_by_freq: divide a row's sum by its token count
  bool packed;  // every grad row and grad_weight row starts 16-byte aligned
  RowGroups groups;
};

template <typename T>
__global__ void pad_embedding_bwd_kernel(const BwdParams<T> p) {
  constexpr int N = kVec<T>;
  using A = acc_t<T>;
  const int tpr = p.groups.threads_per_row;
  const int64_t lane = threadIdx.x % tpr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * p.groups.rows_per_block;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * p.groups.rows_per_block + threadIdx.x / tpr;
       r < p.V; r += stride) {
    const int64_t begin = p.starts[r], end = p.starts[r + 1];
    double factor = p.scale;
    if (p.freq && end > begin) factor /= static_cast<double>(end - begin);
    const A f = static_cast<A>(factor);
    T* dst = p.grad_weight + r * p.D;
    for (int64_t j0 = lane * N; j0 < p.D; j0 += tpr * N) {
      A acc[N];
#pragma unroll
      for (int k = 0; k < N; ++k) acc[k] = A(0);
      int64_t t = begin;
      for (; t + kLoadsInFlight <= end; t += kLoadsInFlight) {
        A v[kLoadsInFlight][N];
#pragma unroll
        for (int u = 0; u < kLoadsInFlight; ++u) {
          load_partial(p.grad + p.order[t + u] * p.D, p.packed, j0, p.D, v[u], A(0));
        }
#pragma unroll
        for (int u = 0; u < kLoadsInFlight; ++u) {
#pragma unroll
          for (int k = 0; k < N; ++k) acc[k] += v[u][k];
        }
      }
      for (; t < end; ++t) {
        A v[N];
        load_partial(p.grad + p.order[t] * p.D, p.packed, j0, p.D, v, A(0));
#pragma unroll
        for (int k = 0; k < N; ++k) acc[k] += v[k];
      }
#pragma unroll
      for (int k = 0; k < N; ++k) acc[k] *= f;
      store_partial(dst, p.packed, j0, p.D, acc);
    }
  }
}

Tensor pad_embedding_bwd_cuda(const Tensor& grad_in, const Tensor& ids_in, int64_t num_weights,
                              int64_t pad, bool scale_grad_by_freq, double scale) {
  checks::pad_embedding_bwd(grad_in, ids_in, num_weights);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const Tensor grad = grad_in.contiguous();
  const int64_t D = grad.size(1);
  Tensor grad_weight = at::empty({num_weights, D}, grad.options());
  if (num_weights == 0 || D == 0) return grad_weight;

  const Tensor ids = ids_in.to(at::kLong);
  const Tensor counted = ids.ge(0).logical_and_(ids.lt(num_weights)).logical_and_(ids.ne(pad));
  const Tensor keys = at::where(counted, ids, num_weights);
  const auto [sorted_keys, order] = at::sort(keys, /*stable=*/std::optional<bool>(true), /*dim=*/0);
  const Tensor starts = at::searchsorted(sorted_keys, at::arange(num_weights + 1, ids.options()));

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "pad_embedding_bwd_cuda", [&] {
        constexpr int N_ = kVec<scalar_t>;
        BwdParams<scalar_t> p{};
        p.grad_weight = grad_weight.mutable_data_ptr<scalar_t>();
        p.grad = grad.const_data_ptr<scalar_t>();
        p.order = order.const_data_ptr<int64_t>();
        p.starts = starts.const_data_ptr<int64_t>();
        p.V = num_weights;
        p.D = D;
        p.scale = scale;
        p.freq = scale_grad_by_freq;
        p.packed = host_aligned(p.grad) && host_aligned(p.grad_weight) && D % N_ == 0;
        p.groups = row_groups((D + N_ - 1) / N_);
        pad_embedding_bwd_kernel<<<grid_blocks(num_weights, p.groups), kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_weight;
}

}  // namespace
}  // namespace maskkern

TORCH_LIBRARY_IMPL(maskkern, CUDA, m) {
  m.impl("pad_embedding_fwd", &maskkern::pad_embedding_fwd_cuda);
  m.impl("pad_embedding_bwd", &maskkern::pad_embedding_bwd_cuda);
}
