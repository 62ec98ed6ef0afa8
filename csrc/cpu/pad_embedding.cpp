// pad_embedding on CPU.
//
// Forward: a row gather, parallel over tokens. A row is a copy (or one vectorised multiply when
// scale != 1); pad positions under zero_pad, and out-of-range ids, are zero-filled without
// touching the weight.
//
// Backward: a counting sort of the token positions by id (pad and out-of-range ids left out)
// gives every weight row the list of its tokens in token order. Each row then has one owner that
// sums its tokens' grad rows into an fp32 (fp64) accumulator and writes the row once — rows with
// no token are written as zeros. No atomics and a fixed summation order: the result is the same
// bits on every run and for any thread count, and for fp32/fp64 with scale 1 it is bit-identical
// to PyTorch's CPU backward (which also adds the tokens in order, starting from zero).
//
// Both outputs are large and written exactly once: they come from the output cache (see
// output_memory.h), and whole rows are written with non-temporal stores (see stream_store.h).

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
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/output_memory.h"
#include "cpu/parallel.h"
#include "cpu/stream_store.h"
#include "cpu/vec_row.h"

namespace maskkern {
namespace {

template <typename index_t>
inline bool in_range(index_t id, int64_t num_weights) {
  return id >= 0 && static_cast<int64_t>(id) < num_weights;
}

// --- forward ---------------------------------------------------------------------------------

template <typename scalar_t>
void copy_scaled_row(scalar_t* dst, const scalar_t* src, acc_type<scalar_t> scale, int64_t D) {
  using Vec = Vectorized<acc_type<scalar_t>>;
  // For fp16/bf16, map converts to fp32 and back: the product is rounded once, as in eager.
  at::vec::map([scale](Vec x) { return x * Vec(scale); }, dst, src, D);
}

template <typename scalar_t, typename index_t>
void gather_rows(const index_t* ids, int64_t N, const scalar_t* weight, int64_t row_stride,
                 int64_t num_weights, int64_t D, int64_t pad, bool zero_pad, double scale,
                 scalar_t* out) {
  const auto s = static_cast<acc_type<scalar_t>>(scale);
  const bool scaled = scale != 1.0;
  // Tokens per task: kTasksPerThread tasks a thread, none under min_rows_per_task.
  const int64_t pieces = kTasksPerThread * at::get_num_threads();
  const int64_t chunk = std::max(min_rows_per_task(D), (N + pieces - 1) / pieces);
  parallel_tasks((N + chunk - 1) / chunk, [&](const auto& claim) {
    for (int64_t task = 0; claim(task);) {
      for (int64_t n = task * chunk; n < std::min(N, (task + 1) * chunk); ++n) {
        const index_t id = ids[n];
        scalar_t* dst = out + n * D;
        if (!in_range(id, num_weights) || (zero_pad && id == pad)) {
          stream_copy(dst, nullptr, D * sizeof(scalar_t));
        } else if (scaled) {
          copy_scaled_row(dst, weight + static_cast<int64_t>(id) * row_stride, s, D);
        } else {
          stream_copy(dst, weight + static_cast<int64_t>(id) * row_stride, D * sizeof(scalar_t));
        }
      }
    }
  });
}

at::Tensor pad_embedding_fwd(const at::Tensor& ids_in, const at::Tensor& weight, int64_t pad,
                             bool zero_pad, double scale) {
  checks::pad_embedding_fwd(ids_in, weight);
  const at::Tensor ids = ids_in.contiguous();
  const int64_t N = ids.size(0), V = weight.size(0), D = weight.size(1);
  at::Tensor out = empty_for_writing({N, D}, weight.options());
  if (N == 0 || D == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "pad_embedding_fwd", [&] {
        AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "pad_embedding_fwd", [&] {
          gather_rows(ids.const_data_ptr<index_t>(), N, weight.const_data_ptr<scalar_t>(),
                      weight.stride(0), V, D, pad, zero_pad, scale,
                      out.mutable_data_ptr<scalar_t>());
        });
      });
  return out;
}

// --- backward --------------------------------------------------------------------------------

// Token positions grouped by id, in token order within an id: the tokens of row r are
// order[offsets[r] .. offsets[r + 1]). Pad and out-of-range ids are left out.
struct TokensById {
  std::vector<int64_t> offsets;
  std::vector<int64_t> order;
};

template <typename index_t>
TokensById sort_tokens_by_id(const index_t* ids, int64_t N, int64_t num_weights, int64_t pad) {
  TokensById t;
  t.offsets.assign(num_weights + 1, 0);
  for (const auto n : c10::irange(N)) {
    const index_t id = ids[n];
    if (in_range(id, num_weights) && id != pad) {
      ++t.offsets[static_cast<int64_t>(id) + 1];
    }
  }
  for (const auto r : c10::irange(num_weights)) {
    t.offsets[r + 1] += t.offsets[r];
  }
  t.order.resize(t.offsets[num_weights]);
  std::vector<int64_t> next(t.offsets.begin(), t.offsets.end() - 1);
  for (const auto n : c10::irange(N)) {
    const index_t id = ids[n];
    if (in_range(id, num_weights) && id != pad) {
      t.order[next[id]++] = n;
    }
  }
  return t;
}

// acc[0, D) += src[0, D), src converted to the accumulator type.
template <typename scalar_t>
void add_row(acc_type<scalar_t>* acc, const scalar_t* src, int64_t D) {
  using fVec = Vectorized<acc_type<scalar_t>>;
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    at::vec::map2([](fVec a, fVec b) { return a + b; }, acc, acc, src, D);
  } else {
    using bVec = Vectorized<scalar_t>;
    int64_t d = 0;
    for (; d + bVec::size() <= D; d += bVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(bVec::loadu(src + d));
      (fVec::loadu(acc + d) + lo).store(acc + d);
      (fVec::loadu(acc + d + fVec::size()) + hi).store(acc + d + fVec::size());
    }
    for (; d < D; ++d) {
      acc[d] += static_cast<float>(src[d]);
    }
  }
}

// Split rows [0, V) into `tasks` ranges of about equal work, a row costing one row write plus
// one row read per token: offsets[r] + r is the work before row r.
std::vector<int64_t> balanced_row_splits(const std::vector<int64_t>& offsets, int64_t tasks) {
  const int64_t V = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t total = offsets[V] + V;
  std::vector<int64_t> splits(tasks + 1, V);
  splits[0] = 0;
  int64_t r = 0;
  for (int64_t t = 1; t < tasks; ++t) {
    const int64_t target = total * t / tasks;
    while (r < V && offsets[r] + r < target) {
      ++r;
    }
    splits[t] = r;
  }
  return splits;
}

template <typename scalar_t>
void reduce_rows(const scalar_t* grad, const TokensById& tokens, int64_t num_weights, int64_t D,
                 bool scale_grad_by_freq, double scale, scalar_t* grad_weight) {
  using acc_t = acc_type<scalar_t>;
  using fVec = Vectorized<acc_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t tasks =
      std::max<int64_t>(1, std::min(kTasksPerThread * at::get_num_threads(), num_weights));
  const std::vector<int64_t> splits = balanced_row_splits(tokens.offsets, tasks);
  parallel_tasks(tasks, [&](const auto& claim) {
    // A row is summed in an fp32 (fp64) buffer that stays in L1, then written out once.
    std::vector<acc_t> buffer(D);
    acc_t* acc = buffer.data();
    for (int64_t task = 0; claim(task);) {
      for (int64_t r = splits[task]; r < splits[task + 1]; ++r) {
        const int64_t begin = tokens.offsets[r], end = tokens.offsets[r + 1];
        scalar_t* dst = grad_weight + r * D;
        if (begin == end) {
          stream_copy(dst, nullptr, D * sizeof(scalar_t));
          continue;
        }
        std::fill(acc, acc + D, acc_t(0));
        for (int64_t k = begin; k < end; ++k) {
          add_row(acc, grad + tokens.order[k] * D, D);
        }
        double factor = scale;
        if (scale_grad_by_freq) {
          factor /= static_cast<double>(end - begin);
        }
        const auto f = static_cast<acc_t>(factor);
        if constexpr (kSameType) {
          if (factor != 1.0) {
            at::vec::map([f](fVec x) { return x * fVec(f); }, acc, acc, D);
          }
          stream_copy(dst, acc, D * sizeof(scalar_t));
        } else {
          at::vec::map([f](fVec x) { return x * fVec(f); }, dst, acc, D);
        }
      }
    }
  });
}

at::Tensor pad_embedding_bwd(const at::Tensor& grad_in, const at::Tensor& ids_in,
                             int64_t num_weights, int64_t pad, bool scale_grad_by_freq,
                             double scale) {
  checks::pad_embedding_bwd(grad_in, ids_in, num_weights);
  const at::Tensor grad = grad_in.contiguous(), ids = ids_in.contiguous();
  const int64_t N = grad.size(0), D = grad.size(1);
  at::Tensor grad_weight = empty_for_writing({num_weights, D}, grad.options());
  if (num_weights == 0 || D == 0) {
    return grad_weight;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "pad_embedding_bwd", [&] {
        AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "pad_embedding_bwd", [&] {
          const TokensById tokens =
              sort_tokens_by_id(ids.const_data_ptr<index_t>(), N, num_weights, pad);
          reduce_rows(grad.const_data_ptr<scalar_t>(), tokens, num_weights, D, scale_grad_by_freq,
                      scale, grad_weight.mutable_data_ptr<scalar_t>());
        });
      });
  return grad_weight;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskkern, CPU, m) {
  m.impl("pad_embedding_fwd", &pad_embedding_fwd);
  m.impl("pad_embedding_bwd", &pad_embedding_bwd);
}

}  // namespace maskkern
