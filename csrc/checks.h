// The kernel ops' contract checks (the schemas in csrc/maskkern.cpp), shared by the CPU and the
// CUDA kernels of every op.
//
// The rule: every user-facing check lives in the public Python function (maskkern/ops/, with the
// shared checkers of maskkern/ops/_common.py), which names the user's argument and raises
// ValueError/TypeError/IndexError before any kernel runs. A kernel op only asserts what it needs to
// index memory safely, so a failure here is a bug in maskkern's Python layer (or a direct call of a
// kernel op that breaks its contract), never a user error: one message style, one place.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

// TORCH_CHECK, not TORCH_INTERNAL_ASSERT: that one would ask the reader to report a PyTorch bug.
#define MASKKERN_ASSERT(cond, op, ...) \
  TORCH_CHECK(cond, "maskkern::", op, " (kernel contract, see csrc/maskkern.cpp): ", __VA_ARGS__)

namespace maskkern::checks {

inline bool is_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// The compute type of a float dtype: fp64 for fp64, fp32 for the others.
inline at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// t: one of the four float dtypes, `dim` dims, on `device`.
inline void float_tensor(const char* op, const at::Tensor& t, const char* name, int64_t dim,
                         const c10::Device& device) {
  MASKKERN_ASSERT(t.device() == device, op, name, " must be on ", device, ", got ", t.device());
  MASKKERN_ASSERT(t.dim() == dim, op, name, " must have ", dim, " dims, got shape ", t.sizes());
  MASKKERN_ASSERT(is_float(t.scalar_type()), op, name,
                  " must be float16/bfloat16/float32/float64, got ", t.scalar_type());
}

// t: the shape, dtype and device of `like`.
inline void same_as(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like,
                    const char* like_name) {
  MASKKERN_ASSERT(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type() &&
                      t.device() == like.device(),
                  op, name, " must have ", like_name, "'s shape ", like.sizes(), ", dtype ",
                  like.scalar_type(), " and device ", like.device(), ", got ", t.sizes(), ", ",
                  t.scalar_type(), ", ", t.device());
}

// An optional (size,) vector of dtype on device.
inline void vector(const char* op, const std::optional<at::Tensor>& t, const char* name,
                   int64_t size, at::ScalarType dtype, const c10::Device& device) {
  if (!t.has_value()) {
    return;
  }
  MASKKERN_ASSERT(t->device() == device, op, name, " must be on ", device, ", got ", t->device());
  MASKKERN_ASSERT(t->dim() == 1 && t->size(0) == size, op, name, " must have shape (", size,
                  ",), got ", t->sizes());
  MASKKERN_ASSERT(t->scalar_type() == dtype, op, name, " must be ", dtype, ", got ",
                  t->scalar_type());
}

// ids: (N,) int32 or int64 on device.
inline void ids(const char* op, const at::Tensor& ids, const c10::Device& device) {
  MASKKERN_ASSERT(ids.device() == device, op, "ids must be on ", device, ", got ", ids.device());
  MASKKERN_ASSERT(ids.dim() == 1, op, "ids must be 1-D, got shape ", ids.sizes());
  MASKKERN_ASSERT(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op,
                  "ids must be int32 or int64, got ", ids.scalar_type());
}

// masked_softmax's mask: a view of like's shape, bool or like's dtype, on like's device.
inline void mask_view(const char* op, const std::optional<at::Tensor>& mask,
                      const at::Tensor& like) {
  if (!mask.has_value()) {
    return;
  }
  MASKKERN_ASSERT(mask->device() == like.device(), op, "mask must be on ", like.device(), ", got ",
                  mask->device());
  MASKKERN_ASSERT(mask->sizes() == like.sizes(), op, "mask must be a view of shape ", like.sizes(),
                  ", got ", mask->sizes());
  MASKKERN_ASSERT(mask->scalar_type() == at::kBool || mask->scalar_type() == like.scalar_type(), op,
                  "mask must be bool or ", like.scalar_type(), ", got ", mask->scalar_type());
}

// causal: 0 none, 1 top-left, 2 bottom-right.
inline void causal_code(const char* op, int64_t causal) {
  MASKKERN_ASSERT(causal >= 0 && causal <= 2, op, "causal must be 0, 1 or 2, got ", causal);
}

// --- each kernel op's contract, asserted alike by its CPU and its CUDA kernel -------------------
// Every tensor is on the device of the op's first tensor (the one the dispatcher routed on).

inline void masked_softmax_fwd(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& lengths,
                               const std::optional<at::Tensor>& query_lengths, int64_t causal) {
  constexpr const char* op = "masked_softmax_fwd";
  float_tensor(op, scores, "scores", 4, scores.device());
  mask_view(op, mask, scores);
  vector(op, lengths, "lengths", scores.size(0), at::kLong, scores.device());
  vector(op, query_lengths, "query_lengths", scores.size(0), at::kLong, scores.device());
  causal_code(op, causal);
}

inline void masked_softmax_bwd(const at::Tensor& grad, const at::Tensor& out,
                               const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& lengths,
                               const std::optional<at::Tensor>& query_lengths, int64_t causal) {
  constexpr const char* op = "masked_softmax_bwd";
  float_tensor(op, out, "out", 4, grad.device());
  same_as(op, grad, "grad", out, "out");
  mask_view(op, mask, out);
  vector(op, lengths, "lengths", out.size(0), at::kLong, out.device());
  vector(op, query_lengths, "query_lengths", out.size(0), at::kLong, out.device());
  causal_code(op, causal);
}

inline void masked_cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                     const at::Tensor& valid,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& grad_scale,
                                     const std::optional<at::Tensor>& grad) {
  constexpr const char* op = "masked_cross_entropy_fwd";
  const c10::Device device = logits.device();
  float_tensor(op, logits, "logits", 2, device);
  const int64_t N = logits.size(0), C = logits.size(1);
  const at::ScalarType acc = compute_type(logits.scalar_type());
  vector(op, target, "target", N, at::kLong, device);
  vector(op, valid, "valid", N, at::kBool, device);
  vector(op, weight, "weight", C, acc, device);
  vector(op, grad_scale, "grad_scale", 2, acc, device);
  if (grad.has_value()) {
    same_as(op, *grad, "grad", logits, "logits");
    MASKKERN_ASSERT(grad->is_contiguous(), op, "grad must be contiguous");
  }
}

inline void masked_cross_entropy_scale_(const at::Tensor& grad, const at::Tensor& valid,
                                        const at::Tensor& grad_loss) {
  constexpr const char* op = "masked_cross_entropy_scale_";
  float_tensor(op, grad, "grad", 2, grad.device());
  MASKKERN_ASSERT(grad.is_contiguous(), op, "grad must be contiguous");
  const int64_t N = grad.size(0);
  vector(op, valid, "valid", N, at::kBool, grad.device());
  vector(op, grad_loss, "grad_loss", grad_loss.numel() == 1 ? 1 : N,
         compute_type(grad.scalar_type()), grad.device());
}

inline void pad_embedding_fwd(const at::Tensor& ids_in, const at::Tensor& weight) {
  constexpr const char* op = "pad_embedding_fwd";
  ids(op, ids_in, weight.device());
  float_tensor(op, weight, "weight", 2, weight.device());
  MASKKERN_ASSERT(weight.stride(1) == 1 || weight.size(1) <= 1, op,
                  "weight must have unit column stride, got strides ", weight.strides());
}

inline void pad_embedding_bwd(const at::Tensor& grad, const at::Tensor& ids_in,
                              int64_t num_weights) {
  constexpr const char* op = "pad_embedding_bwd";
  float_tensor(op, grad, "grad", 2, grad.device());
  ids(op, ids_in, grad.device());
  MASKKERN_ASSERT(grad.size(0) == ids_in.size(0), op, "grad must have N = ", ids_in.size(0),
                  " rows (ids.size(0)), got shape ", grad.sizes());
  MASKKERN_ASSERT(num_weights >= 0, op, "num_weights must be >= 0, got ", num_weights);
}

}  // namespace maskkern::checks
