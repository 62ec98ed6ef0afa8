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
#include <vector>

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

// --- attention ---------------------------------------------------------------------------------

// The largest D and Dv of the fused attention kernels (MAX_HEAD_DIM in maskkern/ops/attention.py):
// their tiles hold a row of q, k and v per query or key in L1.
constexpr int64_t kAttentionMaxHeadDim = 256;

// t: the 4-D sizes given, q's dtype and device, and unit stride along D (rows are read along it).
inline void attention_rows(const char* op, const at::Tensor& t, const char* name,
                           at::IntArrayRef sizes, const at::Tensor& q) {
  MASKKERN_ASSERT(t.device() == q.device(), op, name, " must be on ", q.device(), ", got ",
                  t.device());
  MASKKERN_ASSERT(t.sizes() == sizes, op, name, " must have shape ", sizes, ", got ", t.sizes());
  MASKKERN_ASSERT(t.scalar_type() == q.scalar_type(), op, name, " must have q's dtype ",
                  q.scalar_type(), ", got ", t.scalar_type());
  MASKKERN_ASSERT(t.stride(3) == 1 || t.size(3) <= 1, op, name,
                  " must have unit stride along its last dim, got strides ", t.strides());
}

// cu: an int64 (n + 1,) vector of row offsets into `rows` rows: 0 first, non-decreasing, at most
// `rows` last. Reads the values on the host (attention has a CPU kernel only).
inline void cu_seqlens(const char* op, const at::Tensor& cu, const char* name, int64_t rows,
                       const c10::Device& device) {
  MASKKERN_ASSERT(cu.device() == device, op, name, " must be on ", device, ", got ", cu.device());
  MASKKERN_ASSERT(cu.dim() == 1 && cu.size(0) >= 1, op, name, " must have shape (n + 1,), got ",
                  cu.sizes());
  MASKKERN_ASSERT(cu.scalar_type() == at::kLong, op, name, " must be int64, got ",
                  cu.scalar_type());
  const int64_t* values = cu.const_data_ptr<int64_t>();
  const int64_t stride = cu.stride(0), n = cu.size(0) - 1;
  MASKKERN_ASSERT(values[0] == 0, op, name, " must start at 0, got ", values[0]);
  for (int64_t s = 0; s < n; ++s) {
    MASKKERN_ASSERT(values[s * stride] <= values[(s + 1) * stride], op, name,
                    " must be non-decreasing, got ", values[s * stride], " then ",
                    values[(s + 1) * stride]);
  }
  MASKKERN_ASSERT(values[n * stride] <= rows, op, name, " must end at or before its tensor's ",
                  rows, " rows, got ", values[n * stride]);
}

// What attention_fwd and attention_bwd share: q, k, v and the masks (the schema comment).
inline void attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const std::optional<at::Tensor>& mask,
                             const std::optional<at::Tensor>& mask_tiles,
                             const std::optional<at::Tensor>& lengths,
                             const std::optional<at::Tensor>& query_lengths,
                             const std::optional<at::Tensor>& cu_seqlens_q,
                             const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                             int64_t max_seqlen_k, int64_t causal, int64_t window_left,
                             int64_t window_right, int64_t block_q, int64_t block_k) {
  const c10::Device device = q.device();
  float_tensor(op, q, "q", 4, device);
  float_tensor(op, k, "k", 4, device);
  float_tensor(op, v, "v", 4, device);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3);
  attention_rows(op, q, "q", q.sizes(), q);
  attention_rows(op, k, "k", {B, Hkv, Lk, D}, q);
  attention_rows(op, v, "v", {B, Hkv, Lk, Dv}, q);
  MASKKERN_ASSERT(Hkv > 0 ? Hq % Hkv == 0 : Hq == 0, op,
                  "q's heads must be a multiple of k's, got Hq = ", Hq, " and Hkv = ", Hkv);
  MASKKERN_ASSERT(D <= kAttentionMaxHeadDim && Dv <= kAttentionMaxHeadDim, op,
                  "D and Dv must be <= ", kAttentionMaxHeadDim, ", got D = ", D, " and Dv = ", Dv);
  MASKKERN_ASSERT(block_q > 0 && block_k > 0, op, "block_q and block_k must be > 0, got ", block_q,
                  " and ", block_k);
  causal_code(op, causal);
  MASKKERN_ASSERT(window_left >= -1 && window_right >= -1, op,
                  "window_left and window_right must be >= -1, got ", window_left, " and ",
                  window_right);
  MASKKERN_ASSERT(max_seqlen_q >= 0 && max_seqlen_k >= 0, op,
                  "max_seqlen_q and max_seqlen_k must be >= 0, got ", max_seqlen_q, " and ",
                  max_seqlen_k);
  vector(op, lengths, "lengths", B, at::kLong, device);
  vector(op, query_lengths, "query_lengths", B, at::kLong, device);
  if (mask.has_value()) {
    MASKKERN_ASSERT(mask->device() == device, op, "mask must be on ", device, ", got ",
                    mask->device());
    const std::vector<int64_t> scores{B, Hq, Lq, Lk};
    MASKKERN_ASSERT(mask->sizes() == scores, op, "mask must be a view of shape ",
                    at::IntArrayRef(scores), ", got ", mask->sizes());
    MASKKERN_ASSERT(mask->scalar_type() == at::kBool || mask->scalar_type() == q.scalar_type(), op,
                    "mask must be bool or ", q.scalar_type(), ", got ", mask->scalar_type());
  }
  if (mask_tiles.has_value()) {
    MASKKERN_ASSERT(mask.has_value() && mask->scalar_type() == at::kBool, op,
                    "mask_tiles must come with a bool mask");
    MASKKERN_ASSERT(mask_tiles->device() == device, op, "mask_tiles must be on ", device, ", got ",
                    mask_tiles->device());
    const std::vector<int64_t> tiles{B, Hq, (Lq + block_q - 1) / block_q,
                                     (Lk + block_k - 1) / block_k};
    MASKKERN_ASSERT(mask_tiles->sizes() == tiles, op, "mask_tiles must be a view of shape ",
                    at::IntArrayRef(tiles), ", got ", mask_tiles->sizes());
    MASKKERN_ASSERT(mask_tiles->scalar_type() == at::kChar, op, "mask_tiles must be int8, got ",
                    mask_tiles->scalar_type());
  }
  MASKKERN_ASSERT(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), op,
                  "cu_seqlens_q and cu_seqlens_k must be given together");
  if (cu_seqlens_q.has_value()) {
    MASKKERN_ASSERT(B == 1, op, "packed sequences (cu_seqlens) need batch 1, got q of shape ",
                    q.sizes());
    MASKKERN_ASSERT(!mask.has_value() && !lengths.has_value() && !query_lengths.has_value(), op,
                    "packed sequences (cu_seqlens) take no mask, lengths or query_lengths");
    MASKKERN_ASSERT(cu_seqlens_q->numel() == cu_seqlens_k->numel(), op,
                    "cu_seqlens_q and cu_seqlens_k must have one size, got ", cu_seqlens_q->sizes(),
                    " and ", cu_seqlens_k->sizes());
    cu_seqlens(op, *cu_seqlens_q, "cu_seqlens_q", Lq, device);
    cu_seqlens(op, *cu_seqlens_k, "cu_seqlens_k", Lk, device);
  }
}

inline void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask,
                          const std::optional<at::Tensor>& mask_tiles,
                          const std::optional<at::Tensor>& lengths,
                          const std::optional<at::Tensor>& query_lengths,
                          const std::optional<at::Tensor>& cu_seqlens_q,
                          const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                          int64_t max_seqlen_k, int64_t causal, int64_t window_left,
                          int64_t window_right, int64_t block_q, int64_t block_k) {
  attention_inputs("attention_fwd", q, k, v, mask, mask_tiles, lengths, query_lengths, cu_seqlens_q,
                   cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_left, window_right,
                   block_q, block_k);
}

inline void attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& mask_tiles, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& query_lengths, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    int64_t causal, int64_t window_left, int64_t window_right, int64_t block_q, int64_t block_k) {
  constexpr const char* op = "attention_bwd";
  attention_inputs(op, q, k, v, mask, mask_tiles, lengths, query_lengths, cu_seqlens_q,
                   cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_left, window_right,
                   block_q, block_k);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), Dv = v.size(3);
  attention_rows(op, out, "out", {B, Hq, Lq, Dv}, q);
  attention_rows(op, grad_out, "grad_out", {B, Hq, Lq, Dv}, q);
  MASKKERN_ASSERT(lse.device() == q.device(), op, "lse must be on ", q.device(), ", got ",
                  lse.device());
  const std::vector<int64_t> rows{B, Hq, Lq};
  MASKKERN_ASSERT(lse.sizes() == rows, op, "lse must have shape ", at::IntArrayRef(rows), ", got ",
                  lse.sizes());
  MASKKERN_ASSERT(lse.scalar_type() == compute_type(q.scalar_type()), op, "lse must be ",
                  compute_type(q.scalar_type()), ", got ", lse.scalar_type());
}

}  // namespace maskkern::checks
