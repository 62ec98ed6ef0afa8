"""masked_cross_entropy: ``F.cross_entropy`` with class-index targets, plus a ``mask`` and z-loss,
computing the loss and the logits gradient in one pass over each row.

Layers, top to bottom, as for every op: the public function (argument checks), the opaque custom
op ``maskkern::masked_cross_entropy`` (layout to rows, target range check, backend dispatch,
reduction; fake; autograd), its backward ops, and the per-backend kernels, which all see the same
arguments:

    fwd(logits (N, C) with class stride 1, target int64 (N,), valid bool (N,),
        weight None | (C,) compute dtype, label_smoothing, z_loss, grad_scale None | (2,),
        grad None | (N, C) contiguous, written) -> (ce (N,), lse (N,)) in the compute dtype

ce_i = (1-ε)·w[y_i]·(lse_i - x_iy) + ε/C·Σ_c w_c·(lse_i - x_ic) and 0 on rows that do not count
(valid = target != ignore_index, and mask); grad receives s_ce·d(ce_i)/dx_i + s_z·d(z·lse_i²)/dx_i
with (s_ce, s_z) = grad_scale — (1/Σw[y], 1/count) under "mean", so that the gradient of the
reduced loss is ready — and zeros on rows that do not count, which are never read. The reduction
and its denominators are torch ops on (N,)-sized tensors: no host synchronisation except the
target range check.

    scale_(grad (N, C) contiguous, valid (N,), factors (1,) | (N,) compute dtype) -> None:
        grad[i] *= factors[i] on the rows that count and whose factor is not 1, in place

Memory: forward allocates one logits-sized buffer, the gradient — or, when the logits had to be
copied to rows (class dim not last, or strided), computes the gradient in place in that copy.
The backward has two custom ops, one decision between them made by the autograd formula:

- ``maskkern::masked_cross_entropy_backward_`` scales that saved buffer in place by the incoming
  gradient (per row under "none") with the backend's ``scale_`` kernel, and the formula hands the
  buffer on: fwd+bwd hold one logits-sized buffer beyond the input. Used when the graph is freed
  after this backward (the buffer is no one else's). Rows that do not count keep their zero
  gradient whatever the incoming gradient holds there (0 · inf would be NaN; eager gives 0); the
  kernels do not even touch them, nor rows whose factor is 1 (loss.backward() of a mean or sum:
  then the backward reads N factors, not the buffer).
- ``maskkern::masked_cross_entropy_backward`` multiplies out of place (a torch broadcast multiply on
  every backend: one pass, no kernel to write), so that another backward sees the buffer unchanged:
  when the graph is kept (retain_graph, gradcheck) or traced (torch.compile, whose graphs may not
  mutate a saved tensor).

The loss is not twice differentiable. On the ``cpu`` backend the buffer comes from the C++ output
cache (csrc/cpu/output_memory.h), already faulted in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import reference
from .._backend import native_extension_loaded, resolve_backend
from ._common import (
    FLOAT_DTYPES,
    check_class_targets,
    check_dtype,
    check_index_dtype,
    check_int,
    check_label_smoothing,
    check_reduction,
    check_same_device,
    check_target_mask,
    check_tensor,
    check_z_loss,
    compute_dtype,
    empty_output,
    graph_is_kept,
    is_traced,
)


def masked_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    backend: str | None = None,
) -> Tensor:
    """Cross-entropy of ``input`` logits against class indices; rows whose target equals
    ``ignore_index`` or where ``mask`` is False do not count.

    Replaces ``F.cross_entropy(input, target, weight, ignore_index=ignore_index,
    reduction=reduction, label_smoothing=label_smoothing)`` with the same results (class weights,
    label smoothing, the weighted-mean denominator, NaN with a zero gradient for a mean over no
    counted target) and, for a mask, ``F.cross_entropy(input, target.masked_fill(~mask, -100))``.

    Args:
        input: logits (C,), (N, C) or (N, C, d1, ...) of float16/bfloat16/float32/float64.
        target: int64 or int32 class indices, shape () / (N,) / (N, d1, ...).
        weight: optional (C,) float class weights (they scale each counted row by w[target]);
            constants, as in eager: one that requires grad raises under grad mode.
        ignore_index: targets equal to this value do not count (any int, inside [0, C) too).
        mask: optional bool of target's shape, True = the target counts (ANDed with ignore_index).
        reduction: "none" (target's shape), "sum" or "mean" (divided by Σ w[target] over the
            counted rows, their number without weights).
        label_smoothing: in [0, 1], PyTorch's formula (smoothing term weighted by the class weights).
        z_loss: adds z_loss·logsumexp² for each counted row, not class-weighted; under "mean"
            that term is divided by the number of counted rows.
        backend: "triton", "cuda", "cpu", "torch" or None (the default for input's device).

    Returns:
        The loss in ``input``'s dtype (math in fp32, fp64 for fp64 input).

    Raises:
        IndexError: a counted target outside [0, C) (on CUDA this check synchronises).
    """
    check_tensor(input, "input")
    check_dtype(input, "input", FLOAT_DTYPES)
    check_tensor(target, "target")
    check_index_dtype(target, "target")
    check_same_device(target, "target", input, "input")
    expected = _target_shape(input)
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target must have shape {expected} for input of shape {tuple(input.shape)}, "
            f"got {tuple(target.shape)}"
        )
    n_classes = input.shape[0 if input.dim() == 1 else 1]
    if weight is not None:
        check_tensor(weight, "weight")
        check_dtype(weight, "weight", FLOAT_DTYPES)
        check_same_device(weight, "weight", input, "input")
        if tuple(weight.shape) != (n_classes,):
            raise ValueError(f"weight must have shape ({n_classes},), got {tuple(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled():  # as eager, which raises here too
            raise RuntimeError(
                "masked_cross_entropy is not differentiable with respect to weight (nor is "
                "F.cross_entropy): pass weight.detach()"
            )
    check_target_mask(mask, target)
    check_int(ignore_index, "ignore_index")
    check_reduction(reduction)
    label_smoothing = check_label_smoothing(label_smoothing)
    z_loss = check_z_loss(z_loss)
    backend = resolve_backend(backend, input.device, "input")
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    loss, _ = torch.ops.maskkern.masked_cross_entropy(
        input, target, weight, mask, ignore_index, reduction, label_smoothing, z_loss, compute_grad, backend
    )
    return loss


def _target_shape(input: Tensor) -> tuple[int, ...]:
    if input.dim() == 0:
        raise ValueError("input must be (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    if input.dim() == 1:
        return ()
    return (input.shape[0], *input.shape[2:])


# --- per-backend kernels ------------------------------------------------------------------------


def row_kernel(backend: str):
    """The fwd row kernel of ``backend`` (see the module docstring for its contract)."""
    if backend in ("cpu", "cuda"):
        return torch.ops.maskkern.masked_cross_entropy_fwd
    if backend == "triton":
        from ..triton_kernels import masked_cross_entropy as tk

        return tk.masked_cross_entropy_fwd
    return reference.masked_cross_entropy_rows


def _torch_scale_(grad: Tensor, valid: Tensor, factors: Tensor) -> None:
    grad.mul_(torch.where(valid, factors, 1).reshape(-1, 1))  # x 1: the other rows stay as they are


def scale_kernel(backend: str):
    """The in-place backward scale of ``backend`` (see the module docstring for its contract)."""
    if backend in ("cpu", "cuda"):
        return torch.ops.maskkern.masked_cross_entropy_scale_
    if backend == "triton":
        from ..triton_kernels import masked_cross_entropy as tk

        return tk.masked_cross_entropy_scale_
    return _torch_scale_


def valid_rows(target: Tensor, ignore_index: int, mask: Tensor | None) -> Tensor:
    """valid (N,) bool: the rows that count (target != ignore_index, and mask), unchecked."""
    valid = target.reshape(-1) != ignore_index
    if mask is not None:
        valid &= mask.reshape(-1)
    return valid


def counted_rows(target: Tensor, n_classes: int, ignore_index: int, mask: Tensor | None) -> Tensor:
    """valid (N,) bool for int64 (N,) targets; raises IndexError for a counted target outside
    [0, C). Reads the values: call it inside a custom op (on CUDA it synchronises)."""
    valid = valid_rows(target, ignore_index, mask)
    check_class_targets(target, valid, n_classes, ignore_index)
    return valid


def mean_denominators(valid: Tensor, row_weight: Tensor) -> Tensor:
    """(Σ w[y_i], count) over the counted rows, in row_weight's dtype: "mean" divides the CE part
    by the first and the z-loss part by the second (0/0 = NaN when nothing counts, as in PyTorch).
    Rows that do not count get a zero gradient whatever these are: the kernels never scale them."""
    return torch.stack([row_weight.sum(), valid.sum().to(row_weight.dtype)])


def reduce_rows(
    ce: Tensor, lse: Tensor, reduction: str, z_loss: float, denominators: Tensor | None
) -> Tensor:
    """The reduced loss (compute dtype) from the per-row CE and lse (0 on rows that do not count)."""
    zterm = z_loss * lse * lse if z_loss else None
    if reduction == "none":
        return ce if zterm is None else ce + zterm
    if reduction == "sum":
        return ce.sum() if zterm is None else (ce + zterm).sum()
    loss = ce.sum() / denominators[0]
    return loss if zterm is None else loss + zterm.sum() / denominators[1]


def to_rows(x: Tensor) -> Tensor:
    """(C,) / (N, C) / (N, C, d1, ...) -> (rows, C) with class stride 1 (a view when possible)."""
    if x.dim() == 1:
        rows = x[None]
    elif x.dim() == 2:
        rows = x
    else:
        rows = x.movedim(1, -1).reshape(-1, x.shape[1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def from_rows(rows: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of ``to_rows`` for a contiguous (rows, C) tensor: a view of ``shape``."""
    if len(shape) <= 2:
        return rows.view(shape)
    return rows.view(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# --- the custom op ------------------------------------------------------------------------------


@torch.library.custom_op("maskkern::masked_cross_entropy", mutates_args=())
def _masked_cross_entropy_op(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    mask: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(loss, grad_rows): grad_rows (N, C) is d loss / d logits for a unit incoming gradient
    (per row under "none"), empty when not compute_grad."""
    cdt = compute_dtype(input.dtype)
    n_classes = input.shape[0 if input.dim() == 1 else 1]
    t = target.reshape(-1).long()
    valid = counted_rows(t, n_classes, ignore_index, mask)
    w = None if weight is None else weight.to(cdt)
    safe = t.masked_fill(~valid, 0)
    row_weight = valid.to(cdt) if w is None else torch.where(valid, w[safe], 0)

    rows = to_rows(input)
    grad = None
    if compute_grad:
        # Our own copy of the logits is overwritten by their gradient: no second buffer.
        owned = rows.numel() > 0 and not shares_memory(rows, input)
        grad = rows if owned else empty_output(rows.shape, input.dtype, input.device, backend)
    denominators = mean_denominators(valid, row_weight) if reduction == "mean" else None
    if rows.numel() == 0:
        ce = lse = torch.zeros(t.shape, dtype=cdt, device=input.device)
    else:
        grad_scale = None if denominators is None else 1.0 / denominators
        ce, lse = row_kernel(backend)(rows, t, valid, w, label_smoothing, z_loss, grad_scale, grad)
    loss = reduce_rows(ce, lse, reduction, z_loss, denominators)
    if reduction == "none":
        loss = loss.view(target.shape)
    grad = input.new_empty(0) if grad is None else grad
    return loss.to(input.dtype), grad


@_masked_cross_entropy_op.register_fake
def _(input, target, weight, mask, ignore_index, reduction, label_smoothing, z_loss, compute_grad, backend):
    n_rows, n_classes = target.numel(), input.shape[0 if input.dim() == 1 else 1]
    loss = input.new_empty(target.shape if reduction == "none" else ())
    return loss, input.new_empty((n_rows, n_classes) if compute_grad else (0,))


@torch.library.custom_op("maskkern::masked_cross_entropy_backward", mutates_args=())
def _masked_cross_entropy_backward_op(grad_rows: Tensor, grad_loss: Tensor, valid: Tensor) -> Tensor:
    """grad_rows (N, C) * grad_loss, a scalar or (N,) (one factor per row), on the rows where valid
    (N,) holds, the others left zero: a torch broadcast multiply, one rounding from fp32; out of
    place, so the saved buffer stays valid for another backward through the same graph."""
    return grad_rows * row_factors(grad_loss, valid)


@_masked_cross_entropy_backward_op.register_fake
def _(grad_rows, grad_loss, valid):
    return torch.empty_like(grad_rows)


@torch.library.custom_op("maskkern::masked_cross_entropy_backward_", mutates_args=("grad_rows",))
def _masked_cross_entropy_backward_inplace_op(
    grad_rows: Tensor, grad_loss: Tensor, valid: Tensor, backend: str
) -> None:
    """grad_rows (N, C) contiguous *= grad_loss (a scalar or (N,)) on the rows where valid (N,)
    holds, in place, by the backend's scale_ kernel: the rows that do not count (zeros) are not
    touched whatever their factor, nor the rows whose factor is 1."""
    if grad_rows.numel() == 0:
        return
    factors = grad_loss.reshape(-1).to(compute_dtype(grad_rows.dtype))
    scale_kernel(backend)(grad_rows, valid, factors)


@_masked_cross_entropy_backward_inplace_op.register_fake
def _(grad_rows, grad_loss, valid, backend):
    return None


def row_factors(grad_loss: Tensor, valid: Tensor) -> Tensor:
    """(N, 1): the incoming gradient of each row, 0 on rows that do not count (their gradient
    rows are zeros, and 0 · inf would be NaN)."""
    return torch.where(valid, grad_loss.reshape(-1), 0).reshape(-1, 1)


def _setup_context(ctx, inputs, output):
    input, target, _, mask, ignore_index, *_, compute_grad, backend = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)  # else autograd allocates a zero logits-sized grad for it
    ctx.save_for_backward(grad, target, mask)
    ctx.input_shape, ctx.compute_grad = input.shape, compute_grad
    ctx.ignore_index, ctx.backend = ignore_index, backend


def _backward(ctx, grad_loss, _grad_rows):
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,) * 10
    if not ctx.compute_grad:
        raise RuntimeError(
            "masked_cross_entropy ran with grad disabled for input, so its gradient was not computed"
        )
    grad, target, mask = ctx.saved_tensors
    valid = valid_rows(target, ctx.ignore_index, mask)
    if is_traced(grad_loss) or graph_is_kept():
        dx = torch.ops.maskkern.masked_cross_entropy_backward(grad, grad_loss, valid)
        return (from_rows(dx, ctx.input_shape), *(None,) * 9)
    # The graph is freed after this: the buffer is ours to scale in place and hand on.
    torch.ops.maskkern.masked_cross_entropy_backward_(grad, grad_loss, valid, ctx.backend)
    return (from_rows(grad, ctx.input_shape), *(None,) * 9)


_masked_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def _register_native_fakes() -> None:
    """The C++ kernel op is called inside the opaque op above, but gets a fake too so that
    opcheck and tracing can see it on its own."""

    @torch.library.register_fake("maskkern::masked_cross_entropy_fwd")
    def _(logits, target, valid, weight, label_smoothing, z_loss, grad_scale, grad):
        cdt = compute_dtype(logits.dtype)
        return logits.new_empty(target.shape, dtype=cdt), logits.new_empty(target.shape, dtype=cdt)

    @torch.library.register_fake("maskkern::masked_cross_entropy_scale_")
    def _(grad, valid, grad_loss):
        return None


# --- module -------------------------------------------------------------------------------------


class MaskedCrossEntropyLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` (same constructor, same state_dict) computed by
    ``masked_cross_entropy``, with ``z_loss`` and a forward ``mask`` (True = the target counts).
    Class-index targets only."""

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        check_reduction(self.reduction)
        self.z_loss = check_z_loss(z_loss)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return masked_cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            mask=mask,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, backend={self.backend!r}"
        )


if native_extension_loaded():
    _register_native_fakes()
