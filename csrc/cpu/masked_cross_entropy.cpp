// masked_cross_entropy on CPU: one row = the C logits of one target. The contract is in
// csrc/maskkern.cpp; the reduction over rows is done by the caller on (N,)-sized tensors.
//
// A row that does not count is never read: its ce and lse are 0 and its gradient row zeros. A
// counted row makes two passes over its logits, the first from memory and the second from L1/L2
// (a 32000-class fp32 row is 125 KiB): the max; then e = exp(x - max) kept in a per-thread fp32
// (fp64) scratch row, sum(e) and, with label smoothing, sum(w_c * (max - x_c)) (both terms of the
// smoothing sum are >= 0: no cancellation). The gradient e_c * coef - s_ce * eps/C * w_c is then
// made from the scratch (one exp per logit, not two) and stored in the logits' dtype, with the
// target's element recomputed in fp32 (fp64) so that its (1-eps) * w_y is subtracted before the
// one rounding. A gradient larger than kStreamBytes comes from the output cache (the caller
// allocates it with maskkern::empty_for_writing) and is written with streaming stores: the row is
// finished in the scratch, then streamed out (stream_store.h). Math in fp32 for half inputs, fp64
// for fp64. Rows run in parallel, a contiguous range of them per thread (parallel_row_ranges); each
// output element is written by one thread in a fixed order: the result is deterministic.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/parallel.h"
#include "cpu/stream_store.h"
#include "cpu/vec_row.h"

namespace maskkern {
namespace {

template <typename acc_t>
struct Params {
  int64_t C, row_stride;
  const int64_t* target;
  const bool* valid;
  const acc_t* weight;  // (C,) or nullptr
  acc_t weight_sum;     // sum of weight (C without weights)
  acc_t smoothing;      // label_smoothing
  acc_t z_loss;
  acc_t s_ce, s_z;  // grad_scale
};

// e: scratch of C acc_t rounded up to whole vectors.
template <typename scalar_t>
void cross_entropy_row(const Params<acc_type<scalar_t>>& p, int64_t i, const scalar_t* x,
                       acc_type<scalar_t>* ce, acc_type<scalar_t>* lse, acc_type<scalar_t>* e,
                       scalar_t* g, bool stream) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t lanes = Vec::size();
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t C = p.C;
  const int64_t t = p.target[i];
  if (!p.valid[i]) {
    ce[i] = lse[i] = 0;
    if (g != nullptr) {
      write_row<scalar_t>(g, nullptr, 0, C, stream);
    }
    return;
  }

  Vec vmax(-kInf);
  for (int64_t j = 0; j < C; j += lanes) {
    const int64_t count = std::min(lanes, C - j);
    vmax = at::vec::maximum(vmax, Vec::set(Vec(-kInf), load(x + j, count), count));  // keeps NaN
  }
  const acc_t m = at::vec::vec_reduce_all<acc_t>(Max<acc_t>(), vmax);
  // The Python layer has checked the target; an unchecked one still reads nothing out of bounds.
  // A NaN, +inf (inf - inf) or an all -inf row gives NaN, as log_softmax does in eager.
  if (t < 0 || t >= C || !std::isfinite(m)) {
    ce[i] = lse[i] = kNaN;
    if (g != nullptr) {
      std::fill_n(g, C, static_cast<scalar_t>(kNaN));
    }
    return;
  }

  const bool smooth = p.smoothing != 0;
  const Vec vm(m), zero(0);
  Vec vsum(0), vsmooth(0);
  for (int64_t j = 0; j < C; j += lanes) {
    const int64_t count = std::min(lanes, C - j);
    const Vec v = load(x + j, count);
    const Vec ej = Vec::set(zero, fast_exp(v - vm), count);
    ej.store(e + j);
    vsum = vsum + ej;
    if (smooth) {
      const Vec d = Vec::set(zero, vm - v, count);
      vsmooth = vsmooth + (p.weight != nullptr ? d * Vec::loadu(p.weight + j, count) : d);
    }
  }
  const acc_t sum = at::vec::vec_reduce_all<acc_t>(Sum<acc_t>(), vsum);
  const acc_t row_lse = m + std::log(sum);
  const acc_t x_t = static_cast<acc_t>(x[t]);  // read now: the gradient may overwrite x
  const acc_t w_t = p.weight != nullptr ? p.weight[t] : acc_t(1);
  const acc_t eps = p.smoothing / static_cast<acc_t>(C);
  acc_t row_ce = (1 - p.smoothing) * w_t * (row_lse - x_t);
  if (smooth) {
    const acc_t smooth_sum = at::vec::vec_reduce_all<acc_t>(Sum<acc_t>(), vsmooth);
    row_ce += eps * (p.weight_sum * (row_lse - m) + smooth_sum);
  }
  ce[i] = row_ce;
  lse[i] = row_lse;
  if (g == nullptr) {
    return;
  }

  // d/dx_c = p_c * (s_ce * ((1-eps) w_y + eps/C * sum(w)) + s_z * 2 z lse) - s_ce * eps/C * w_c
  //          - [c == y] * s_ce * (1-eps) * w_y, with p_c = exp(x_c - m) / sum.
  const acc_t coef =
      (p.s_ce * ((1 - p.smoothing) * w_t + eps * p.weight_sum) + p.s_z * 2 * p.z_loss * row_lse) /
      sum;
  // Streaming, the row is finished in place in e (a scalar_t never outgrows its acc_t: each store
  // lands on elements already read).
  scalar_t* row = stream ? reinterpret_cast<scalar_t*>(e) : g;
  const Vec vcoef(coef), veps(p.s_ce * eps);
  for (int64_t j = 0; j < C; j += lanes) {
    const int64_t count = std::min(lanes, C - j);
    Vec d = Vec::loadu(e + j) * vcoef;
    if (smooth) {
      d = d - (p.weight != nullptr ? veps * Vec::loadu(p.weight + j, count) : veps);
    }
    store(row + j, d, count);
  }
  row[t] = static_cast<scalar_t>(std::exp(x_t - m) * coef - p.s_ce * eps * w_t -
                                 p.s_ce * (1 - p.smoothing) * w_t);
  write_row(g, row, C, C, stream);
}

template <typename scalar_t>
void cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& valid,
                        const c10::optional<at::Tensor>& weight, double label_smoothing,
                        double z_loss, const c10::optional<at::Tensor>& grad_scale,
                        const c10::optional<at::Tensor>& grad, at::Tensor& ce, at::Tensor& lse) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1);
  Params<acc_t> p{C,
                  logits.stride(0),
                  target.const_data_ptr<int64_t>(),
                  valid.const_data_ptr<bool>(),
                  weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr,
                  static_cast<acc_t>(C),
                  static_cast<acc_t>(label_smoothing),
                  static_cast<acc_t>(z_loss),
                  1,
                  1};
  if (weight.has_value()) {
    p.weight_sum = weight->sum().item<acc_t>();
  }
  if (grad_scale.has_value()) {
    const at::Tensor s = grad_scale->contiguous();
    p.s_ce = s.const_data_ptr<acc_t>()[0];
    p.s_z = s.const_data_ptr<acc_t>()[1];
  }
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  scalar_t* g = grad.has_value() ? grad->mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* ce_ptr = ce.mutable_data_ptr<acc_t>();
  acc_t* lse_ptr = lse.mutable_data_ptr<acc_t>();
  const bool stream = g != nullptr && worth_streaming(grad->nbytes());
  constexpr int64_t lanes = Vectorized<acc_t>::size();
  parallel_row_ranges(N, C, [&](int64_t first, int64_t end) {
    std::vector<acc_t> scratch(static_cast<size_t>((C + lanes - 1) / lanes * lanes));
    for (const auto i : c10::irange(first, end)) {
      cross_entropy_row<scalar_t>(p, i, x + i * p.row_stride, ce_ptr, lse_ptr, scratch.data(),
                                  g == nullptr ? nullptr : g + i * C, stream);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> masked_cross_entropy_fwd(
    const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& valid_in,
    const c10::optional<at::Tensor>& weight_in, double label_smoothing, double z_loss,
    const c10::optional<at::Tensor>& grad_scale_in, const c10::optional<at::Tensor>& grad) {
  checks::masked_cross_entropy_fwd(logits_in, target_in, valid_in, weight_in, grad_scale_in, grad);
  const auto dtype = logits_in.scalar_type();
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  const at::ScalarType acc = checks::compute_type(dtype);
  // Class stride 1 is the fast layout the Python layer provides; anything else is copied.
  const at::Tensor logits = logits_in.stride(1) == 1 || C <= 1 ? logits_in : logits_in.contiguous();
  const at::Tensor target = target_in.contiguous(), valid = valid_in.contiguous();
  const auto weight =
      weight_in.has_value() ? c10::optional<at::Tensor>(weight_in->contiguous()) : c10::nullopt;
  at::Tensor ce = at::empty({N}, logits.options().dtype(acc));
  at::Tensor lse = at::empty({N}, logits.options().dtype(acc));
  if (N == 0) {
    return {ce, lse};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "masked_cross_entropy", [&] {
    cross_entropy_rows<scalar_t>(logits, target, valid, weight, label_smoothing, z_loss,
                                 grad_scale_in, grad, ce, lse);
  });
  return {ce, lse};
}

// Backward: the saved gradient rows scaled in place by the incoming gradient. Rows that do not
// count are zeros and are not touched — their gradient stays 0 whatever grad_loss holds there (an
// inf would make 0 * inf = NaN), as in eager — and a factor of 1 (loss.backward()) skips the row.
void masked_cross_entropy_scale_(at::Tensor& grad, const at::Tensor& valid_in,
                                 const at::Tensor& grad_loss_in) {
  checks::masked_cross_entropy_scale_(grad, valid_in, grad_loss_in);
  const int64_t N = grad.size(0), C = grad.size(1);
  const at::Tensor valid = valid_in.contiguous(), grad_loss = grad_loss_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "masked_cross_entropy_scale_", [&] {
        using acc_t = acc_type<scalar_t>;
        using Vec = Vectorized<acc_t>;
        scalar_t* g = grad.mutable_data_ptr<scalar_t>();
        const bool* keep = valid.const_data_ptr<bool>();
        const acc_t* factor = grad_loss.const_data_ptr<acc_t>();
        const int64_t factor_stride = grad_loss.numel() == 1 ? 0 : 1;
        parallel_row_ranges(N, C, [&](int64_t first, int64_t end) {
          for (const auto i : c10::irange(first, end)) {
            const acc_t f = factor[i * factor_stride];
            if (keep[i] && f != acc_t(1)) {
              // One rounding from the compute type, as torch's multiply.
              at::vec::map([f](Vec x) { return x * Vec(f); }, g + i * C, g + i * C, C);
            }
          }
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(maskkern, CPU, m) {
  m.impl("masked_cross_entropy_fwd", &masked_cross_entropy_fwd);
  m.impl("masked_cross_entropy_scale_", &masked_cross_entropy_scale_);
}

}  // namespace maskkern
