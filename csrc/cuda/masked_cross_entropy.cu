// masked_cross_entropy on CUDA: one thread block per row of C logits; the contract is in
// csrc/maskkern.cpp (the same as the CPU kernel's), the reduction over rows is done by the caller.
// The backward's in-place scale (masked_cross_entropy_scale_) is at the end.
//
// A row that does not count is never read: ce = lse = 0 and its gradient row zeros. A counted row
// makes three coalesced passes (the 2nd and 3rd mostly from L2): the block max; sum(exp(x - max))
// and, with label smoothing, sum(w_c * (max - x_c)) and sum(w_c) (both smoothing terms >= 0); the
// gradient p_c * coef - s_ce * eps/C * w_c, minus s_ce * (1-eps) * w_y at the target, subtracted in
// fp32 (fp64) before the one rounding. Gradient scales are read on the device: no host
// synchronisation. Offsets are int64. Each output is written by one thread and the block
// reductions have a fixed order: results are deterministic.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "checks.h"
#include "common.cuh"

namespace maskkern {
namespace {

using device::block_allreduce;
using device::kWarpSize;
using device::MaxKeepNaN;
using device::Sum;

template <typename scalar_t>
struct Params {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* logits;
  scalar_t* grad;  // (N, C) contiguous or nullptr; may equal logits
  const int64_t* target;
  const bool* valid;
  const acc_t* weight;      // (C,) or nullptr
  const acc_t* grad_scale;  // (2,) = (s_ce, s_z) or nullptr
  acc_t* ce;
  acc_t* lse;
  int64_t C, row_stride;
  acc_t smoothing, z_loss;
};

// Launched with up to 1024 threads: the bound makes ptxas keep registers within what that allows.
template <typename scalar_t>
__global__ void __launch_bounds__(1024) cross_entropy_kernel(const Params<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t buf[kWarpSize];
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t row = blockIdx.x;
  const int64_t C = p.C;
  const int64_t step = blockDim.x;
  scalar_t* g = p.grad == nullptr ? nullptr : p.grad + row * C;

  if (!p.valid[row]) {  // the whole block leaves together: no barrier is skipped
    if (threadIdx.x == 0) p.ce[row] = p.lse[row] = 0;
    if (g != nullptr) {
      for (int64_t j = threadIdx.x; j < C; j += step) g[j] = scalar_t(0);
    }
    return;
  }
  const scalar_t* x = p.logits + row * p.row_stride;
  const int64_t t = p.target[row];

  acc_t m = -kInf;
  for (int64_t j = threadIdx.x; j < C; j += step) m = MaxKeepNaN()(m, static_cast<acc_t>(x[j]));
  m = block_allreduce(m, buf, MaxKeepNaN());
  // The caller checked the target; an unchecked one still reads nothing out of bounds. A NaN,
  // +inf (inf - inf) or an all -inf row gives NaN, as log_softmax does in eager.
  if (t < 0 || t >= C || !isfinite(m)) {
    if (threadIdx.x == 0) p.ce[row] = p.lse[row] = kNaN;
    if (g != nullptr) {
      for (int64_t j = threadIdx.x; j < C; j += step) g[j] = static_cast<scalar_t>(kNaN);
    }
    return;
  }

  const bool smooth = p.smoothing != 0;
  acc_t sum = 0, smooth_sum = 0, weight_sum = 0;
  for (int64_t j = threadIdx.x; j < C; j += step) {
    const acc_t v = static_cast<acc_t>(x[j]);
    sum += ::exp(v - m);
    if (smooth) {
      const acc_t w = p.weight != nullptr ? p.weight[j] : acc_t(1);
      smooth_sum += w * (m - v);
      weight_sum += w;
    }
  }
  sum = block_allreduce(sum, buf, Sum());
  if (smooth) {
    smooth_sum = block_allreduce(smooth_sum, buf, Sum());
    weight_sum = block_allreduce(weight_sum, buf, Sum());
  }
  const acc_t row_lse = m + ::log(sum);
  const acc_t x_t = static_cast<acc_t>(x[t]);  // every thread reads it before any gradient store
  const acc_t w_t = p.weight != nullptr ? p.weight[t] : acc_t(1);
  const acc_t eps = p.smoothing / static_cast<acc_t>(C);
  if (threadIdx.x == 0) {
    acc_t row_ce = (1 - p.smoothing) * w_t * (row_lse - x_t);
    if (smooth) row_ce += eps * (weight_sum * (row_lse - m) + smooth_sum);
    p.ce[row] = row_ce;
    p.lse[row] = row_lse;
  }
  if (g == nullptr) return;
  // In place (g == x) the target's logit must be read by all threads before anyone overwrites it.
  __syncthreads();

  const acc_t s_ce = p.grad_scale != nullptr ? p.grad_scale[0] : acc_t(1);
  const acc_t s_z = p.grad_scale != nullptr ? p.grad_scale[1] : acc_t(1);
  const acc_t coef =
      (s_ce * ((1 - p.smoothing) * w_t + eps * weight_sum) + s_z * 2 * p.z_loss * row_lse) / sum;
  const acc_t true_class = s_ce * (1 - p.smoothing) * w_t;
  for (int64_t j = threadIdx.x; j < C; j += step) {
    acc_t d = ::exp(static_cast<acc_t>(x[j]) - m) * coef;
    if (smooth) d -= s_ce * eps * (p.weight != nullptr ? p.weight[j] : acc_t(1));
    if (j == t) d -= true_class;
    g[j] = static_cast<scalar_t>(d);
  }
}

// Threads of a block that works on one row of C values: enough to cover the row in a few strides,
// at most 1024 (a multiple of 32).
int row_threads(int64_t C) {
  return C >= 16384 ? 1024 : C >= 2048 ? 512 : C >= 256 ? 128 : kWarpSize;
}

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

std::tuple<at::Tensor, at::Tensor> masked_cross_entropy_fwd_cuda(
    const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& valid_in,
    const c10::optional<at::Tensor>& weight_in, double label_smoothing, double z_loss,
    const c10::optional<at::Tensor>& grad_scale_in, const c10::optional<at::Tensor>& grad) {
  checks::masked_cross_entropy_fwd(logits_in, target_in, valid_in, weight_in, grad_scale_in, grad);
  const auto dtype = logits_in.scalar_type();
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  const at::ScalarType acc = checks::compute_type(dtype);
  MASKKERN_ASSERT(N <= std::numeric_limits<int32_t>::max(), "masked_cross_entropy_fwd",
                  "at most 2^31 - 1 rows, got ", N);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.stride(1) == 1 || C <= 1 ? logits_in : logits_in.contiguous();
  const at::Tensor target = target_in.contiguous(), valid = valid_in.contiguous();
  const auto weight = contiguous(weight_in), grad_scale = contiguous(grad_scale_in);
  at::Tensor ce = at::empty({N}, logits.options().dtype(acc));
  at::Tensor lse = at::empty({N}, logits.options().dtype(acc));
  if (N == 0) {
    return {ce, lse};
  }
  const int threads = row_threads(C);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "masked_cross_entropy_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Params<scalar_t> p;
        p.logits = logits.const_data_ptr<scalar_t>();
        p.grad = grad.has_value() ? grad->mutable_data_ptr<scalar_t>() : nullptr;
        p.target = target.const_data_ptr<int64_t>();
        p.valid = valid.const_data_ptr<bool>();
        p.weight = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
        p.grad_scale = grad_scale.has_value() ? grad_scale->const_data_ptr<acc_t>() : nullptr;
        p.ce = ce.mutable_data_ptr<acc_t>();
        p.lse = lse.mutable_data_ptr<acc_t>();
        p.C = C;
        p.row_stride = logits.stride(0);
        p.smoothing = static_cast<acc_t>(label_smoothing);
        p.z_loss = static_cast<acc_t>(z_loss);
        cross_entropy_kernel<scalar_t><<<static_cast<unsigned>(N), threads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {ce, lse};
}

// Backward: the rows of grad that count, scaled in place by their incoming gradient (one factor
// for all rows, or one per row, read on the device). A row that does not count is zeros and stays
// so whatever its factor (0 * inf would be NaN; eager gives 0), and a factor of 1 (loss.backward()
// of a mean or sum) changes nothing: neither row is read.
template <typename scalar_t>
__global__ void __launch_bounds__(1024)
    scale_kernel(scalar_t* grad, const bool* valid, const at::opmath_type<scalar_t>* factor,
                 int64_t factor_stride, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const acc_t f = factor[row * factor_stride];
  if (!valid[row] || f == acc_t(1)) {
    return;
  }
  scalar_t* g = grad + row * C;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    g[j] = static_cast<scalar_t>(static_cast<acc_t>(g[j]) * f);
  }
}

void masked_cross_entropy_scale_cuda(at::Tensor& grad, const at::Tensor& valid_in,
                                     const at::Tensor& grad_loss_in) {
  checks::masked_cross_entropy_scale_(grad, valid_in, grad_loss_in);
  const int64_t N = grad.size(0), C = grad.size(1);
  MASKKERN_ASSERT(N <= std::numeric_limits<int32_t>::max(), "masked_cross_entropy_scale_",
                  "at most 2^31 - 1 rows, got ", N);
  if (N == 0 || C == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor valid = valid_in.contiguous(), grad_loss = grad_loss_in.contiguous();
  const int64_t factor_stride = grad_loss.numel() == 1 ? 0 : 1;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "masked_cross_entropy_scale_cuda", [&] {
        scale_kernel<scalar_t><<<static_cast<unsigned>(N), row_threads(C), 0, stream>>>(
            grad.mutable_data_ptr<scalar_t>(), valid.const_data_ptr<bool>(),
            grad_loss.const_data_ptr<at::opmath_type<scalar_t>>(), factor_stride, C);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(maskkern, CUDA, m) {
  m.impl("masked_cross_entropy_fwd", &masked_cross_entropy_fwd_cuda);
  m.impl("masked_cross_entropy_scale_", &masked_cross_entropy_scale_cuda);
}

}  // namespace maskkern
