// masked_softmax on CPU: one row = the keys of one (b, h, query) triple of scores (B, H, Lq, Lk).
//
// Each row first gets its extent from lengths, query_lengths and causal, less the keys a bool
// mask drops at the row's end: keys j >= extent are masked, so the kernels never read them and
// write zeros there. Within [0, extent) the forward makes three passes over a per-thread fp32
// (fp64) buffer that stays in L1: z = scores * scale (+ additive, or -inf where the bool mask drops
// a key) and its max, then e = exp(z - max) and its sum, then y = e / sum stored in scores' dtype.
// The backward reads Y and dY only on [0, extent) too: Y is zero beyond it.
//
// Outputs come from the output cache (output_memory.h); those larger than kStreamBytes are written
// with streaming stores (stream_store.h), with their zero tails: straight from the registers when
// the rows are whole cache lines, else through the L1 scratch.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/mask_lanes.h"
#include "cpu/output_memory.h"
#include "cpu/parallel.h"
#include "cpu/prefetch.h"
#include "cpu/stream_store.h"
#include "cpu/vec_row.h"

namespace maskkern {
namespace {

// A row of the mask: elements at ptr[j * stride]. mask_t = bool (true = keep) or scores' dtype
// (additive); NoMask when there is none.
struct NoMask {};

template <typename mask_t>
struct MaskRow {
  const mask_t* ptr;
  int64_t stride;

  // Keys [j, j + count) as a vector: all-ones lanes where a bool mask keeps, else the additive
  // values; lanes beyond count are 0 (dropped / nothing added).
  template <typename acc_t>
  Vectorized<acc_t> load_at(int64_t j, int64_t count) const {
    constexpr int64_t lanes = Vectorized<acc_t>::size();
    const mask_t* src = ptr + j * stride;
    mask_t gathered[lanes] = {};
    if (stride != 1 || count < lanes) {
      for (const auto k : c10::irange(count)) {
        gathered[k] = src[k * stride];
      }
      src = gathered;
    }
    if constexpr (std::is_same_v<mask_t, bool>) {
      return keep_lanes<acc_t>(src);
    } else {
      return load(src, lanes);
    }
  }

  // A row's extent less the keys at its end that a bool mask drops: they need not be read. A key
  // padding mask (B, 1, 1, Lk) then costs what lengths do.
  int64_t trim(int64_t extent) const {
    if constexpr (std::is_same_v<mask_t, bool>) {
      if (stride == 0) {
        return extent > 0 && ptr[0] ? extent : 0;
      }
      if (stride == 1) {
        // 32 keys at a time while all are dropped (bools are bytes of 0 or 1), then 8 at a time,
        // then one by one.
        for (uint64_t words[4]; extent >= 32; extent -= 32) {
          std::memcpy(words, ptr + extent - 32, sizeof(words));
          if ((words[0] | words[1] | words[2] | words[3]) != 0) {
            break;
          }
        }
        for (uint64_t word; extent >= 8; extent -= 8) {
          std::memcpy(&word, ptr + extent - 8, sizeof(word));
          if (word != 0) {
            break;
          }
        }
      }
      while (extent > 0 && !ptr[(extent - 1) * stride]) {
        --extent;
      }
    }
    return extent;
  }
};

// --- rows: their coordinates and their extents -------------------------------------------------

// The coordinates and extents of the rows of scores (or out); keeps the contiguous lengths alive
// while the kernel runs.
class RowGeometry {
 public:
  RowGeometry(const at::Tensor& scores, const c10::optional<at::Tensor>& lengths,
              const c10::optional<at::Tensor>& query_lengths, int64_t causal)
      : lengths_(lengths.has_value() ? lengths->contiguous() : at::Tensor()),
        query_lengths_(query_lengths.has_value() ? query_lengths->contiguous() : at::Tensor()),
        lengths_ptr_(lengths_.defined() ? lengths_.const_data_ptr<int64_t>() : nullptr),
        query_lengths_ptr_(query_lengths_.defined() ? query_lengths_.const_data_ptr<int64_t>()
                                                    : nullptr),
        causal_(causal),
        H_(scores.size(1)),
        Lq_(scores.size(2)),
        Lk_(scores.size(3)) {}

  int64_t row_len() const { return Lk_; }
  int64_t batch(int64_t row) const { return row / (H_ * Lq_); }
  int64_t head(int64_t row) const { return row / Lq_ % H_; }
  int64_t query(int64_t row) const { return row % Lq_; }

  // The row's extent: keys [0, extent) may be visible, everything from extent on is masked. A
  // negative length (check_lengths=False skips the check in Python) masks the whole row: the
  // extent clamps to 0.
  int64_t extent(int64_t row) const {
    const int64_t b = batch(row), i = query(row);
    if (query_lengths_ptr_ != nullptr && i >= query_lengths_ptr_[b]) {
      return 0;
    }
    int64_t end = Lk_;
    if (lengths_ptr_ != nullptr) {
      end = std::min(end, lengths_ptr_[b]);
    }
    if (causal_ == 1) {
      end = std::min(end, i + 1);
    } else if (causal_ == 2) {
      end = std::min(end, i + Lk_ - Lq_ + 1);
    }
    return std::max<int64_t>(end, 0);
  }

 private:
  at::Tensor lengths_, query_lengths_;  // undefined when not given
  const int64_t* lengths_ptr_;          // nullptr when not given
  const int64_t* query_lengths_ptr_;
  int64_t causal_;  // 0 none, 1 top-left, 2 bottom-right
  int64_t H_, Lq_, Lk_;
};

// The rows of a (B, H, Lq, Lk) mask view (mask_t = NoMask: none) and their extents: the
// geometry's, less the keys a bool mask drops at the row's end.
template <typename mask_t>
struct RowMasks {
  const mask_t* data;  // nullptr for NoMask
  at::IntArrayRef strides;
  const RowGeometry& geo;

  MaskRow<mask_t> at(int64_t row) const {
    if constexpr (std::is_same_v<mask_t, NoMask>) {
      return {nullptr, 0};
    } else {
      return {data + geo.batch(row) * strides[0] + geo.head(row) * strides[1] +
                  geo.query(row) * strides[2],
              strides[3]};
    }
  }
  // The row's extent, given its mask row at(row).
  int64_t extent(int64_t row, const MaskRow<mask_t>& mask) const {
    return mask.trim(geo.extent(row));
  }
  int64_t extent(int64_t row) const { return extent(row, at(row)); }
};

// --- forward -----------------------------------------------------------------------------------

// One row: x[0, Lk) -> y[0, Lk), reading x and the mask on [0, extent) only; z holds extent
// rounded up to whole vectors.
template <typename scalar_t, typename mask_t>
void softmax_row(const scalar_t* x, const MaskRow<mask_t>& mask, int64_t extent, int64_t Lk,
                 acc_type<scalar_t> scale, acc_type<scalar_t>* z, scalar_t* y, bool stream) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t lanes = Vec::size();
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const Vec neg_inf(kNegInf);

  // The running max skips NaN (clamp_min is a bare vmaxps): a kept NaN shows in the sum instead.
  Vec vmax = neg_inf;
  for (int64_t j = 0; j < extent; j += lanes) {
    const int64_t count = std::min(lanes, extent - j);
    Vec v = load(x + j, count) * Vec(scale);
    if constexpr (std::is_same_v<mask_t, bool>) {
      v = Vec::blendv(neg_inf, v, mask.template load_at<acc_t>(j, count));
    } else if constexpr (!std::is_same_v<mask_t, NoMask>) {
      v = v + mask.template load_at<acc_t>(j, count);
    }
    v = Vec::set(neg_inf, v, count);  // the lanes past the row take no part
    vmax = at::vec::clamp_min(vmax, v);
    v.store(z + j);
  }
  const acc_t max = at::vec::vec_reduce_all<acc_t>(Max<acc_t>(), vmax);
  // As in eager, a kept NaN, or +inf (inf - inf), makes every output of the row NaN.
  const auto nan_row = [&] {
    std::fill_n(y, Lk, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
  };
  if (max == kNegInf) {  // nothing left in the row, unless it kept a NaN
    if (std::any_of(z, z + extent, [](acc_t v) { return std::isnan(v); })) {
      nan_row();
    } else {
      write_row<scalar_t>(y, nullptr, 0, Lk, stream);
    }
    return;
  }

  const acc_t sum = row_sum<acc_t>(extent, [&](int64_t j, int64_t) {
    const Vec e = fast_exp(Vec::loadu(z + j) - Vec(max));
    e.store(z + j);
    return e;
  });
  if (std::isnan(sum)) {  // exp keeps NaN, and gives NaN for inf - inf
    nan_row();
    return;
  }

  // The scratch for a streamed row is z itself: a scalar_t never outgrows its acc_t, so each store
  // lands on elements already read.
  const Vec inv(acc_t(1) / sum);
  write_row_vectors(y, extent, Lk, stream, reinterpret_cast<scalar_t*>(z),
                    [&](int64_t j, int64_t) { return Vec::loadu(z + j) * inv; });
}

template <typename scalar_t, typename mask_t>
void softmax_rows(const at::Tensor& scores, const RowMasks<mask_t>& masks, double scale,
                  at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Lk = masks.geo.row_len(), rows = scores.numel() / Lk;
  const int64_t tasks = row_tasks(rows, Lk);
  const int64_t padded = (Lk + kLanes<scalar_t> - 1) / kLanes<scalar_t> * kLanes<scalar_t>;
  std::vector<acc_t> scratch(static_cast<size_t>(tasks * padded));
  const scalar_t* x = scores.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const bool stream = worth_streaming(out.nbytes());
  parallel_rows(rows, Lk, tasks, [&](int64_t task, const RowBlock& block) {
    const auto prefetch = [&](int64_t row) { prefetch_row(x + row * Lk, masks.extent(row), Lk); };
    rows_prefetched(block, prefetch_distance<scalar_t>(Lk), 0, prefetch, [&](int64_t row) {
      const MaskRow<mask_t> mask = masks.at(row);
      softmax_row<scalar_t, mask_t>(x + row * Lk, mask, masks.extent(row, mask), Lk,
                                    static_cast<acc_t>(scale), scratch.data() + task * padded,
                                    y + row * Lk, stream);
    });
  });
}

bool is_bool(const c10::optional<at::Tensor>& mask) {
  return mask.has_value() && mask->scalar_type() == at::kBool;
}

at::Tensor masked_softmax_fwd(const at::Tensor& scores_in, const c10::optional<at::Tensor>& mask,
                              const c10::optional<at::Tensor>& lengths,
                              const c10::optional<at::Tensor>& query_lengths, int64_t causal,
                              double scale) {
  checks::masked_softmax_fwd(scores_in, mask, lengths, query_lengths, causal);
  const RowGeometry geo(scores_in, lengths, query_lengths, causal);
  const at::Tensor scores = scores_in.contiguous();
  at::Tensor out = empty_for_writing(scores.sizes(), scores.options());
  if (scores.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, scores.scalar_type(), "masked_softmax", [&] {
        // The mask's kind picks the inner loop: none, bool (keep) or additive in scores' dtype.
        if (!mask.has_value()) {
          softmax_rows<scalar_t>(scores, RowMasks<NoMask>{nullptr, {}, geo}, scale, out);
        } else if (is_bool(mask)) {
          const RowMasks<bool> masks{mask->const_data_ptr<bool>(), mask->strides(), geo};
          softmax_rows<scalar_t>(scores, masks, scale, out);
        } else {
          const RowMasks<scalar_t> masks{mask->const_data_ptr<scalar_t>(), mask->strides(), geo};
          softmax_rows<scalar_t>(scores, masks, scale, out);
        }
      });
  return out;
}

// --- backward ----------------------------------------------------------------------------------

// dx = scale * y * (g - sum(y * g)) on [0, extent); zeros beyond, where y is 0. scratch: len
// elements for write_row_vectors. Flattened so that the loops keep the lambdas' captures in
// registers: called, they reload them after every vector store (an intrinsic's store may alias
// anything). (The forward is not flattened: there it does not pay.)
template <typename scalar_t>
__attribute__((flatten)) void softmax_backward_row(const scalar_t* g, const scalar_t* y,
                                                   int64_t extent, int64_t Lk,
                                                   acc_type<scalar_t> scale, scalar_t* scratch,
                                                   scalar_t* dx, bool stream) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const Vec dot(row_sum<acc_t>(extent, [&](int64_t j, int64_t count) {
    return load(y + j, count) * load(g + j, count);  // lanes past the row are 0
  }));
  write_row_vectors(dx, extent, Lk, stream, scratch, [&](int64_t j, int64_t count) {
    return Vec(scale) * load(y + j, count) * (load(g + j, count) - dot);
  });
}

template <typename scalar_t, typename mask_t>
void softmax_backward_rows(const at::Tensor& grad, const at::Tensor& out,
                           const RowMasks<mask_t>& masks, double scale, at::Tensor& dx) {
  const int64_t Lk = masks.geo.row_len(), rows = out.numel() / Lk;
  const int64_t tasks = row_tasks(rows, Lk);
  const bool stream = worth_streaming(dx.nbytes());
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* y = out.const_data_ptr<scalar_t>();
  scalar_t* d = dx.mutable_data_ptr<scalar_t>();
  const auto s = static_cast<acc_type<scalar_t>>(scale);
  std::vector<scalar_t> scratch(stream ? static_cast<size_t>(tasks * Lk) : 0);
  parallel_rows(rows, Lk, tasks, [&](int64_t task, const RowBlock& block) {
    const auto prefetch = [&](int64_t row) {
      const int64_t extent = masks.extent(row);
      prefetch_row(g + row * Lk, extent, Lk);
      prefetch_row(y + row * Lk, extent, Lk);
    };
    const int64_t ahead = prefetch_distance<scalar_t>(Lk);
    rows_prefetched(block, ahead, ahead / 4, prefetch, [&](int64_t row) {
      softmax_backward_row(g + row * Lk, y + row * Lk, masks.extent(row), Lk, s,
                           scratch.data() + task * Lk, d + row * Lk, stream);
    });
  });
}

// mask: the forward's. A bool mask lets the kernel skip the keys it drops at the rows' ends; an
// additive one is not read (where it is -inf, Y is 0, but finding out means reading it).
at::Tensor masked_softmax_bwd(const at::Tensor& grad_in, const at::Tensor& out_in,
                              const c10::optional<at::Tensor>& mask,
                              const c10::optional<at::Tensor>& lengths,
                              const c10::optional<at::Tensor>& query_lengths, int64_t causal,
                              double scale) {
  checks::masked_softmax_bwd(grad_in, out_in, mask, lengths, query_lengths, causal);
  const RowGeometry geo(out_in, lengths, query_lengths, causal);
  const at::Tensor grad = grad_in.contiguous(), out = out_in.contiguous();
  at::Tensor dx = empty_for_writing(out.sizes(), out.options());
  if (out.numel() == 0) {
    return dx;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "masked_softmax_backward", [&] {
        if (is_bool(mask)) {
          const RowMasks<bool> masks{mask->const_data_ptr<bool>(), mask->strides(), geo};
          softmax_backward_rows<scalar_t>(grad, out, masks, scale, dx);
        } else {
          softmax_backward_rows<scalar_t>(grad, out, RowMasks<NoMask>{nullptr, {}, geo}, scale, dx);
        }
      });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskkern, CPU, m) {
  m.impl("masked_softmax_fwd", &masked_softmax_fwd);
  m.impl("masked_softmax_bwd", &masked_softmax_bwd);
}

}  // namespace maskkern
