// The one TORCH_LIBRARY of maskkern: every native kernel's schema lives here. Kernels register
// themselves per device in csrc/cpu/*.cpp (built once per instruction-set level into
// maskkern._cpu_<level>, of which one is loaded) and csrc/cuda/*.cu; fakes and autograd are
// attached in Python (maskkern/ops/). These are the *kernel* ops behind the public custom ops:
// callers pass tensors already validated and normalised by the Python layer.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import maskkern._C` loads this shared object, which runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(maskkern, m) {
  // masked_softmax: scores (B, H, Lq, Lk); mask None or (B, H, Lq, Lk) read through its strides
  // (bool: true = keep, or scores' float dtype: added after scaling); lengths/query_lengths None
  // or int64 (B,); causal 0 = none, 1 = top-left, 2 = bottom-right. Returns a contiguous tensor.
  m.def(
      "masked_softmax_fwd(Tensor scores, Tensor? mask, Tensor? lengths, Tensor? query_lengths, "
      "int causal, float scale) -> Tensor");
  // dX = scale * Y * (dY - sum(Y * dY)); the forward's mask, lengths and causal only let the
  // kernel skip the keys they drop at the rows' ends (Y is zero there).
  m.def(
      "masked_softmax_bwd(Tensor grad, Tensor out, Tensor? mask, Tensor? lengths, "
      "Tensor? query_lengths, int causal, float scale) -> Tensor");
  // pad_embedding: ids (N,) int32/int64; weight (V, D) with unit column stride (rows read through
  // stride(0)); pad -1 = none, else in [0, V); zero_pad: pad positions give zeros without reading
  // the weight. Ids outside [0, V) give zero rows (the caller checks them unless told not to).
  // Returns out (N, D) = weight[ids] * scale, contiguous.
  m.def(
      "pad_embedding_fwd(Tensor ids, Tensor weight, int pad, bool zero_pad, float scale) "
      "-> Tensor");
  // Dense grad_weight (V, D) in grad's dtype: per row the sum of its tokens' rows of grad (N, D),
  // pad and out-of-range ids skipped, accumulated in fp32 (fp64) in token order (deterministic),
  // times scale (and 1 / count with scale_grad_by_freq).
  m.def(
      "pad_embedding_bwd(Tensor grad, Tensor ids, SymInt num_weights, int pad, "
      "bool scale_grad_by_freq, float scale) -> Tensor");
  // masked_cross_entropy: logits (N, C) with class stride 1 (any row stride); target int64 (N,);
  // valid bool (N,) (rows that count; the others are never read); weight None or (C,) in the
  // compute dtype (fp32, fp64 for fp64). Returns (ce, lse), (N,) in the compute dtype, 0 on rows
  // that do not count. grad, when given, is (N, C) contiguous in logits' dtype (it may be logits
  // itself: a row is read before it is overwritten) and receives s_ce * d(ce)/dx +
  // s_z * d(z_loss * lse^2)/dx, (s_ce, s_z) = grad_scale ((2,) in the compute dtype, or 1 and 1),
  // zeros on rows that do not count.
  m.def(
      "masked_cross_entropy_fwd(Tensor logits, Tensor target, Tensor valid, Tensor? weight, "
      "float label_smoothing, float z_loss, Tensor? grad_scale, Tensor(a!)? grad) "
      "-> (Tensor, Tensor)");
  // grad (N, C) contiguous *= grad_loss (1 or N values in the compute dtype) on the rows where
  // valid (N,) is true; the other rows (zeros) are left as they are.
  m.def("masked_cross_entropy_scale_(Tensor(a!) grad, Tensor valid, Tensor grad_loss) -> ()");
  // attention (flash-style; nothing (Lq, Lk)-sized is allocated):
  // q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), D and Dv <= 256, any strides with
  // stride(-1) == 1; Hq % Hkv == 0 and query head h reads kv head h / (Hq / Hkv). mask None or a
  // (B, Hq, Lq, Lk) strided view: bool (true = keep) or q's dtype (added to the scaled scores).
  // mask_tiles None or, with a bool mask only, an int8 (B, Hq, ceil(Lq / block_q), ceil(Lk /
  // block_k)) strided view of the mask's tiles: 0 = keeps nothing, 1 = some, 2 = all. lengths /
  // query_lengths None or int64 (B,). cu_seqlens_q / cu_seqlens_k None or int64 (n + 1,): packed
  // sequences, q is then (1, Hq, total_q, D) and sequence s owns rows [cu[s], cu[s + 1]) (mask and
  // lengths are None). max_seqlen_q / max_seqlen_k: the longest sequence (Lq, Lk when not packed).
  // causal 0 = none, 1 = top-left, 2 = bottom-right; window_left / window_right -1 = unbounded,
  // measured from the diagonal causal aligns to. block_q x block_k: the kernel's tiles (mask_tiles'
  // grid). Returns out (B, Hq, Lq, Dv) in q's dtype, a view of (B, Lq, Hq, Dv) contiguous memory,
  // and lse (B, Hq, Lq) contiguous in the compute dtype (fp32, fp64 for fp64): +inf on a row that
  // sees no key (its out is zeros, and exp(s - lse) = 0 gives it zero gradient).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? mask_tiles, "
      "Tensor? lengths, Tensor? query_lengths, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, int causal, int window_left, int window_right, "
      "float scale, int block_q, int block_k) -> (Tensor, Tensor)");
  // dq, dk, dv from grad_out (B, Hq, Lq, Dv) (stride(-1) == 1), the forward's inputs, out and lse;
  // each a view of contiguous (B, L, H, D) memory in q's dtype like out. dk and dv sum over the
  // query heads that share a kv head.
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? mask, Tensor? mask_tiles, Tensor? lengths, Tensor? query_lengths, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "int causal, int window_left, int window_right, float scale, int block_q, int block_k) "
      "-> (Tensor, Tensor, Tensor)");
}
