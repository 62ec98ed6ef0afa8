"""linear_cross_entropy: ``masked_cross_entropy(hidden @ weight.T + bias, target)`` without ever
holding the (N, V) logits.

Only the counted tokens (target != ignore_index) are computed, so the work is proportional to
them: they are gathered in chunks, a chunk's logits come from a torch matmul, the backend's
masked_cross_entropy row kernel turns them into the loss and — in place, the chunk buffer is ours —
into their gradient, and torch matmuls fold that into grad_hidden (scattered back to the chunk's
rows; ignored rows get exact zeros), grad_weight and grad_bias. With "sum" and "mean" the gradients
are computed during the forward pass (for a unit incoming gradient) and backward only scales them,
through a backward op as in ``masked_cross_entropy``: ``maskkern::linear_cross_entropy_scale_`` in
place, or ``maskkern::linear_cross_entropy_scale`` out of place when the graph is kept or traced.
With "none" the per-token incoming gradient is only known in backward, which recomputes the chunks
(``maskkern::linear_cross_entropy_backward``). The matmuls are torch's, so every backend works
wherever its row kernel does.

Memory beyond the inputs and the gradients: one logits chunk (``chunk_size`` rows, by default about
32 MiB on CPU), plus an fp32 grad_weight accumulator for half inputs (and, when some tokens are
ignored, the chunk's gathered hidden rows and their gradient, chunk × H each).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._backend import resolve_backend
from ._common import (
    check_label_smoothing,
    check_linear_cross_entropy_args,
    check_reduction,
    check_z_loss,
    compute_dtype,
    graph_is_kept,
    is_traced,
)
from .masked_cross_entropy import counted_rows, reduce_rows, row_kernel

# Logits bytes per chunk: a few tens of MB stay in the CPU's last-level cache and cost little page
# faulting; on a GPU larger chunks feed the matmuls better (at least the size of hidden, like
# Liger's chunk = N / ceil(V / H)).
CPU_CHUNK_BYTES = 32 << 20
GPU_CHUNK_BYTES = 256 << 20


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T + bias`` against ``target``, computed in
    chunks of tokens so that the full (N, V) logits never exist.

    Replaces ``F.cross_entropy(F.linear(hidden, weight, bias).flatten(0, -2), target.flatten(),
    ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)`` (plus
    ``z_loss`` as in ``masked_cross_entropy``), gradients of hidden, weight and bias included.

    Args:
        hidden: (..., H) float16/bfloat16/float32/float64.
        weight: (V, H), hidden's dtype and device.
        target: int64 or int32 class indices of shape hidden.shape[:-1].
        bias: optional (V,), hidden's dtype.
        ignore_index, reduction, label_smoothing, z_loss: as in ``masked_cross_entropy``.
        chunk_size: counted tokens per chunk; None picks one from their number, V and H (about
            32 MiB of logits on CPU).
        backend: the row kernel's backend ("triton", "cuda", "cpu", "torch" or None).

    Returns:
        The loss in hidden's dtype: a scalar, or target's shape for reduction="none".
    """
    label_smoothing, z_loss = check_linear_cross_entropy_args(
        hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size
    )
    backend = resolve_backend(backend, hidden.device, "hidden")
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    loss, *_ = torch.ops.maskkern.linear_cross_entropy(
        hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss,
        chunk_size or 0, *needs, backend,
    )  # fmt: skip
    return loss


def auto_chunk_size(
    n_tokens: int, vocab: int, hidden_size: int, dtype: torch.dtype, device: torch.device
) -> int:
    """Tokens per chunk: the logits chunk takes about CPU_CHUNK_BYTES on CPU; on a GPU at least
    the size of hidden (so the chunk matmuls are as large as hidden's) and GPU_CHUNK_BYTES."""
    row_bytes = max(vocab, 1) * torch.finfo(dtype).bits // 8
    if device.type == "cpu":
        budget = CPU_CHUNK_BYTES
    else:
        budget = max(GPU_CHUNK_BYTES, n_tokens * hidden_size * torch.finfo(dtype).bits // 8)
    return max(1, min(n_tokens, budget // row_bytes))


def _chunked(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int,
    needs: tuple[bool, bool, bool],
    backend: str,
    row_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The chunk loop over the counted rows of (N, H) hidden: (loss, grad_hidden, grad_weight,
    grad_bias), each gradient empty when not needed. With ``row_scale`` (N,) (the "none" backward)
    each token's logits gradient is multiplied by it; else gradients are for a unit incoming
    gradient of the loss."""
    n, vocab = hidden.shape[0], weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    t = target.reshape(-1).long()
    valid = counted_rows(t, vocab, ignore_index, None)
    denominators = None
    grad_scale = None
    if reduction == "mean":
        count = valid.sum().to(cdt)
        denominators = torch.stack([count, count])
        grad_scale = 1.0 / denominators
    # Only the counted rows are computed: they are compacted (gathered) chunk by chunk, so the work
    # shrinks with the ignored targets wherever they are. On CUDA nonzero() synchronises the host
    # once per call (as the target range check in counted_rows already does).
    rows = valid.nonzero().squeeze(1)
    m = rows.numel()
    if m == n:
        rows = None  # every row counts: plain slices, no gathers
    chunk = chunk_size or auto_chunk_size(m, vocab, hidden.shape[1], hidden.dtype, hidden.device)
    need_h, need_w, need_b = needs
    # Half gradients of the weight and bias are sums over all chunks: accumulate them in fp32.
    # Rows that do not count get exact zeros in grad_hidden (never written after the zeros).
    new_grad_h = torch.empty_like if rows is None else torch.zeros_like
    grad_h = new_grad_h(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=cdt, device=weight.device) if need_b else None
    # The per-row CE and lse of the counted rows, in their order.
    ce = torch.empty(m, dtype=cdt, device=hidden.device)
    lse = torch.empty(m, dtype=cdt, device=hidden.device)
    counted = valid if rows is None else valid.new_ones(m)
    kernel = row_kernel(backend)
    for start in range(0, m, chunk):
        end = min(m, start + chunk)
        if rows is None:
            r = None
            h, tc = hidden[start:end], t[start:end]
        else:
            r = rows[start:end]
            h, tc = hidden.index_select(0, r), t.index_select(0, r)
        logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
        grad = logits if any(needs) else None  # overwritten by its own gradient
        ce[start:end], lse[start:end] = kernel(
            logits, tc, counted[start:end], None, label_smoothing, z_loss, grad_scale, grad
        )
        if grad is None:
            continue
        if row_scale is not None:
            scale = row_scale[start:end] if r is None else row_scale.index_select(0, r)
            grad.mul_(scale[:, None].to(grad.dtype))
        if need_h:
            if r is None:
                torch.mm(grad, weight, out=grad_h[start:end])
            else:
                grad_h.index_copy_(0, r, grad @ weight)
        if need_w:
            if grad_w.dtype == grad.dtype:
                grad_w.addmm_(grad.T, h)
            else:
                grad_w += grad.T @ h
        if need_b:
            grad_b += grad.sum(0, dtype=cdt)
    if rows is not None:  # back to all N rows, 0 on those that do not count
        ce = ce.new_zeros(n).index_copy_(0, rows, ce)
        lse = lse.new_zeros(n).index_copy_(0, rows, lse)
    loss = reduce_rows(ce, lse, reduction, z_loss, denominators)
    # Absent gradients are empty tensors, each its own (custom op outputs may not alias).
    return (
        loss.to(hidden.dtype),
        hidden.new_empty(0) if grad_h is None else grad_h,
        hidden.new_empty(0) if grad_w is None else grad_w.to(weight.dtype),
        hidden.new_empty(0) if grad_b is None else grad_b.to(weight.dtype),
    )


# --- the custom ops -----------------------------------------------------------------------------


@torch.library.custom_op("maskkern::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias); the gradients (for a unit incoming gradient)
    only for "sum"/"mean" and those needed, else empty."""
    # N rows, not -1: with H = 0 there would be no telling N from 0 elements.
    h2 = hidden.reshape(target.numel(), hidden.shape[-1])
    needs = (need_hidden, need_weight, need_bias) if reduction != "none" else (False, False, False)
    loss, gh, gw, gb = _chunked(
        h2, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size, needs, backend
    )
    loss = loss.view(target.shape) if reduction == "none" else loss
    # Shaped by need, not by numel: with no tokens the gradient is empty but must be hidden-shaped.
    return loss, gh.view(hidden.shape) if needs[0] else gh, gw, gb


@_linear_cross_entropy_op.register_fake
def _(
    hidden,
    weight,
    target,
    bias,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    chunk_size,
    nh,
    nw,
    nb,
    backend,
):
    in_forward = reduction != "none"
    return (
        hidden.new_empty(target.shape if reduction == "none" else ()),
        torch.empty_like(hidden) if nh and in_forward else hidden.new_empty(0),
        torch.empty_like(weight) if nw and in_forward else hidden.new_empty(0),
        hidden.new_empty(weight.shape[0]) if nb and in_forward else hidden.new_empty(0),
    )


@torch.library.custom_op("maskkern::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(
    grad_loss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of reduction="none": the chunks again, each token's logits gradient times its
    incoming gradient. Returns (grad_hidden, grad_weight, grad_bias), empty when not needed."""
    h2 = hidden.reshape(target.numel(), hidden.shape[-1])
    row_scale = grad_loss.reshape(-1).to(compute_dtype(hidden.dtype))
    needs = (need_hidden, need_weight, need_bias)
    _, gh, gw, gb = _chunked(
        h2, weight, target, bias, ignore_index, "none", label_smoothing, z_loss, chunk_size, needs, backend,
        row_scale,
    )  # fmt: skip
    return gh.view(hidden.shape) if need_hidden else gh, gw, gb


@_linear_cross_entropy_backward_op.register_fake
def _(
    grad_loss,
    hidden,
    weight,
    target,
    bias,
    ignore_index,
    label_smoothing,
    z_loss,
    chunk_size,
    nh,
    nw,
    nb,
    backend,
):
    return (
        torch.empty_like(hidden) if nh else hidden.new_empty(0),
        torch.empty_like(weight) if nw else hidden.new_empty(0),
        hidden.new_empty(weight.shape[0]) if nb else hidden.new_empty(0),
    )


@torch.library.custom_op("maskkern::linear_cross_entropy_scale", mutates_args=())
def _linear_cross_entropy_scale_op(
    grad_hidden: Tensor, grad_weight: Tensor, grad_bias: Tensor, grad_loss: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of "sum"/"mean": the gradients saved by the forward (each empty when not needed)
    times the incoming gradient, a scalar, out of place, so that they stay valid for another
    backward through the same graph (retain_graph, gradcheck) or a traced one (torch.compile)."""
    return grad_hidden * grad_loss, grad_weight * grad_loss, grad_bias * grad_loss


@_linear_cross_entropy_scale_op.register_fake
def _(grad_hidden, grad_weight, grad_bias, grad_loss):
    return torch.empty_like(grad_hidden), torch.empty_like(grad_weight), torch.empty_like(grad_bias)


@torch.library.custom_op(
    "maskkern::linear_cross_entropy_scale_", mutates_args=("grad_hidden", "grad_weight", "grad_bias")
)
def _linear_cross_entropy_scale_inplace_op(
    grad_hidden: Tensor, grad_weight: Tensor, grad_bias: Tensor, grad_loss: Tensor
) -> None:
    """The same in place, when the graph is freed after this backward (the saved gradients are no
    one else's): fwd+bwd hold no second copy of them. A unit incoming gradient (loss.backward()
    of a CPU loss) leaves them as they are."""
    if grad_loss.device.type == "cpu" and bool(grad_loss == 1):
        return
    for g in (grad_hidden, grad_weight, grad_bias):
        g.mul_(grad_loss)


@_linear_cross_entropy_scale_inplace_op.register_fake
def _(grad_hidden, grad_weight, grad_bias, grad_loss):
    return None


def _setup_context(ctx, inputs, output):
    hidden, weight, target, bias, ignore_index, reduction, smoothing, z_loss, chunk, nh, nw, nb, backend = (
        inputs
    )
    _, gh, gw, gb = output
    ctx.mark_non_differentiable(gh, gw, gb)
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    if reduction == "none":
        # Recomputed in backward: the inputs are saved, no activation.
        ctx.save_for_backward(hidden, weight, target, bias)
        ctx.args = (ignore_index, smoothing, z_loss, chunk, nh, nw, nb, backend)
    else:
        ctx.save_for_backward(gh, gw, gb)


def _backward(ctx, grad_loss, *_unused_grads):
    if grad_loss is None or not any(ctx.needs_input_grad[:4]):
        return (None,) * 13
    if ctx.reduction == "none":
        hidden, weight, target, bias = ctx.saved_tensors
        grads = torch.ops.maskkern.linear_cross_entropy_backward(
            grad_loss, hidden, weight, target, bias, *ctx.args
        )
    else:
        grads = ctx.saved_tensors
        if is_traced(grad_loss) or graph_is_kept():
            grads = torch.ops.maskkern.linear_cross_entropy_scale(*grads, grad_loss)
        else:  # the graph is freed after this: the saved gradients are ours to scale in place
            torch.ops.maskkern.linear_cross_entropy_scale_(*grads, grad_loss)
    need = ctx.needs_input_grad
    gh, gw, gb = (g if n else None for g, n in zip(grads, (need[0], need[1], need[3]), strict=True))
    return gh, gw, None, gb, *(None,) * 9


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# --- module -------------------------------------------------------------------------------------


class LinearCrossEntropyLoss(nn.Module):
    """The loss of a classifier head without its logits: ``LinearCrossEntropyLoss()(hidden,
    head.weight, target, head.bias)`` = ``nn.CrossEntropyLoss()(head(hidden), target)``, computed
    by ``linear_cross_entropy`` in chunks of tokens."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.z_loss = check_z_loss(z_loss)
        self.chunk_size, self.backend = chunk_size, backend

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        return linear_cross_entropy(
            hidden,
            weight,
            target,
            bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, chunk_size={self.chunk_size}"
        )
