"""maskkern.distributed on 2 and 3 gloo processes on loopback, spawned here, each world time-boxed
(a process-group timeout and a join deadline): the vocab-parallel losses against the single-process
ops in fp64 (every option, uneven and empty slices, all rows ignored), the DTensor form against
torch's loss_parallel, the DTensor sharding rules of every custom op forward and backward, FSDP2 and
DDP on a tiny model, and bad inputs (a clear error on every rank, the group usable after it).

Several checks share one spawned world: a world costs a few seconds of process start on 2 cores.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import maskkern as mk  # noqa: E402

PG_TIMEOUT_S = 60  # a collective that waits longer fails instead of hanging
JOIN_TIMEOUT_S = 240  # the whole world; then its processes are killed and the test fails
TOL = dict(rtol=1e-10, atol=1e-12)  # fp64 against the single-process op: rounding only


# --- spawning ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, check: str, errors) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
        )
        try:
            globals()[check](rank, world)
        finally:
            dist.destroy_process_group()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise SystemExit(1) from None


def run_world(world: int, check) -> None:
    """Runs ``check(rank, world)`` in ``world`` spawned processes; fails with their tracebacks."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, check.__name__, errors)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        pytest.fail("\n".join(f"--- rank {r}:\n{tb}" for r, tb in sorted(failures)))
    if hung:
        pytest.fail(f"ranks {hung} did not finish within {JOIN_TIMEOUT_S} s (a hang)")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    assert not bad, f"exit codes {bad}"


# --- helpers run inside the ranks ----------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _slices(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _ce_options(n: int, v: int, g: torch.Generator) -> list[dict]:
    """Option sets for the cross-entropies; "weight": "local" means the class weights as slices."""
    w = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    mask = torch.rand(n, generator=g) > 0.3
    out = []
    for reduction in ("mean", "sum", "none"):
        out += [
            dict(reduction=reduction),
            dict(reduction=reduction, weight=w),
            dict(reduction=reduction, weight="local", label_smoothing=0.2, z_loss=0.1),
            dict(reduction=reduction, mask=mask, label_smoothing=0.3),
            dict(reduction=reduction, weight=w, mask=mask, label_smoothing=0.1, z_loss=0.05),
            dict(reduction=reduction, z_loss=0.2, ignore_index=3),
        ]
    return [dict(o, _w=w) for o in out]


def _split_options(opts: dict, sl: slice) -> tuple[dict, dict]:
    """(single-process kwargs, vocab-parallel kwargs) of one option set."""
    opts = dict(opts)
    w = opts.pop("_w")
    ref, ours = dict(opts), dict(opts)
    if opts.get("weight") == "local":
        ref["weight"], ours["weight"] = w, w[sl]
    return ref, ours


def _target_for(opts: dict, t: torch.Tensor) -> torch.Tensor:
    """The targets of an option set: with a custom ignore_index, the -100s become it."""
    ignore = opts.get("ignore_index")
    return t if ignore is None else torch.where(t == -100, ignore, t)


def _check_cross_entropy(rank: int, sizes: list[int], n: int = 13) -> None:
    from maskkern.distributed import vocab_parallel_cross_entropy

    v = sum(sizes)
    sl = _slices(sizes, rank)
    g = _gen(0)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, v, (n,), generator=g)
    t[2] = -100
    for opts in _ce_options(n, v, g):
        ref_kw, our_kw = _split_options(opts, sl)
        tt = _target_for(opts, t)
        xf = x.clone().requires_grad_()
        ref = mk.masked_cross_entropy(xf, tt, **ref_kw)
        go = torch.randn(ref.shape, generator=_gen(1), dtype=torch.float64)
        (ref * go).sum().backward()
        xl = x[:, sl].clone().requires_grad_()
        out = vocab_parallel_cross_entropy(xl, tt, vocab_size=v, **our_kw)
        (out * go).sum().backward()
        torch.testing.assert_close(out, ref.detach(), **TOL, msg=lambda m, o=opts: f"{o}: {m}")
        torch.testing.assert_close(xl.grad, xf.grad[:, sl], **TOL, msg=lambda m, o=opts: f"{o}: {m}")
    # (B, L, V_r) logits, float32 and a -inf slice (vocabulary padding on one rank)
    x3 = torch.randn(2, 4, v, generator=g)
    x3[..., _slices(sizes, len(sizes) - 1)] = -torch.inf  # the last rank's slice: all -inf
    t3 = torch.zeros(2, 4, dtype=torch.long)
    xf = x3.clone().requires_grad_()
    ref = mk.masked_cross_entropy(xf.flatten(0, 1), t3.flatten())
    ref.backward()
    xl = x3[..., sl].clone().requires_grad_()
    out = vocab_parallel_cross_entropy(xl, t3)
    out.backward()
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(xl.grad, xf.grad.view(2, 4, v)[..., sl])
    # all rows ignored: NaN mean, zero gradient (not NaN: the smoothing term scales by 1/0 too)
    w = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    for kw in (
        {},
        dict(label_smoothing=0.1),
        dict(label_smoothing=0.1, weight=w),
        dict(label_smoothing=0.2, weight=w[sl], z_loss=0.1),
    ):
        xl = x[:, sl].clone().requires_grad_()
        out = vocab_parallel_cross_entropy(xl, torch.full((n,), -100), **kw)
        out.backward()
        assert out.isnan(), (kw, out)
        assert torch.equal(xl.grad, torch.zeros_like(xl.grad)), kw
    # non-contiguous logits: a column slice of the full logits (a view, not a leaf), and a slice
    # stored transposed (class stride != 1)
    opts = dict(label_smoothing=0.1, z_loss=0.05, reduction="sum")
    xf = x.clone().requires_grad_()
    ref = mk.masked_cross_entropy(xf, t, **opts)
    ref.backward()
    for transposed in (False, True):
        base = (x[:, sl].t().contiguous() if transposed else x.clone()).requires_grad_()
        xl = base.t() if transposed else base[:, sl]
        assert not xl.is_contiguous() or xl.shape[1] <= 1
        out = vocab_parallel_cross_entropy(xl, t, **opts)
        out.backward()
        torch.testing.assert_close(out, ref.detach(), **TOL)
        grad = base.grad.t() if transposed else base.grad[:, sl]
        torch.testing.assert_close(grad, xf.grad[:, sl], **TOL)
    # bfloat16 against the single-process op in bfloat16: both compute in fp32; the loss rounds
    # once in each, so they agree to one bf16 ulp (they came out equal); the gradient here is
    # rounded twice (the kernel writes p - e_k in bf16, the in-place scale rounds again), so up to
    # two roundings apart: 2 ulps relative, and atol for the entries that round to 0
    xb = x.to(torch.bfloat16)
    xf = xb.clone().requires_grad_()
    ref = mk.masked_cross_entropy(xf, t, z_loss=0.01)
    ref.backward()
    xl = xb[:, sl].clone().requires_grad_()
    out = vocab_parallel_cross_entropy(xl, t, z_loss=0.01)
    out.backward()
    assert out.dtype == xl.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.detach(), rtol=2**-8, atol=0)
    torch.testing.assert_close(xl.grad, xf.grad[:, sl], rtol=2**-7, atol=2**-20)
    # the graph kept (retain_graph): the same gradient twice
    xl = x[:, sl].clone().requires_grad_()
    out = vocab_parallel_cross_entropy(xl, t, reduction="sum", label_smoothing=0.1)
    out.backward(retain_graph=True)
    first = xl.grad.clone()
    out.backward()
    torch.testing.assert_close(xl.grad, 2 * first, **TOL)


def _check_linear_cross_entropy(rank: int, sizes: list[int], n: int = 11, h: int = 6) -> None:
    from maskkern.distributed import vocab_parallel_linear_cross_entropy

    v = sum(sizes)
    sl = _slices(sizes, rank)
    g = _gen(2)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=g)
    t[[1, 5]] = -100
    for i, opts in enumerate(_ce_options(n, v, g)):
        ref_kw, our_kw = _split_options(opts, sl)
        class_weight = our_kw.pop("weight", None)
        with_bias = i % 2 == 0
        tt = _target_for(opts, t)
        hf, wf, bf = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        ref = mk.masked_cross_entropy(F.linear(hf, wf, bf if with_bias else None), tt, **ref_kw)
        go = torch.randn(ref.shape, generator=_gen(3), dtype=torch.float64)
        (ref * go).sum().backward()
        hl, wl, bl = hidden.clone().requires_grad_(), weight[sl].clone().requires_grad_(), bias[sl].clone()
        bl.requires_grad_()
        out = vocab_parallel_linear_cross_entropy(
            hl, wl, tt, bl if with_bias else None, class_weight=class_weight, chunk_size=4, **our_kw
        )
        (out * go).sum().backward()

        def msg(m, o=opts):
            return f"{o}: {m}"

        torch.testing.assert_close(out, ref.detach(), **TOL, msg=msg)
        torch.testing.assert_close(hl.grad, hf.grad, **TOL, msg=msg)
        torch.testing.assert_close(wl.grad, wf.grad[sl], **TOL, msg=msg)
        if with_bias:
            torch.testing.assert_close(bl.grad, bf.grad[sl], **TOL, msg=msg)
    # (B, L, H) hidden, default chunks, only the weight requires grad
    wl = weight[sl].clone().requires_grad_()
    wf = weight.clone().requires_grad_()
    h3 = hidden[:10].view(2, 5, h)
    ref = mk.linear_cross_entropy(h3, wf, t[:10].view(2, 5), label_smoothing=0.1)
    ref.backward()
    out = vocab_parallel_linear_cross_entropy(h3, wl, t[:10].view(2, 5), label_smoothing=0.1)
    out.backward()
    torch.testing.assert_close(out, ref.detach(), **TOL)
    torch.testing.assert_close(wl.grad, wf.grad[sl], **TOL)
    # all rows ignored: NaN mean, zero gradients
    for kw in ({}, dict(label_smoothing=0.1, z_loss=0.1)):
        hl, wl = hidden.clone().requires_grad_(), weight[sl].clone().requires_grad_()
        out = vocab_parallel_linear_cross_entropy(hl, wl, torch.full((n,), -100), **kw)
        out.backward()
        assert out.isnan(), (kw, out)
        assert torch.equal(hl.grad, torch.zeros_like(hl.grad)), kw
        assert torch.equal(wl.grad, torch.zeros_like(wl.grad)), kw
    # vocabulary padding on the last rank: its bias is -inf, so its slice of every row is all
    # -inf (the kernel's row statistics are NaN there and the logits already overwritten by
    # their gradient when they are found); the targets are real classes
    last = _slices(sizes, len(sizes) - 1)
    padded_bias = bias.clone()
    padded_bias[last] = -torch.inf
    tp = t.clamp(max=last.start - 1)
    hf, wf = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = mk.linear_cross_entropy(hf, wf, tp, padded_bias, label_smoothing=0.1)
    ref.backward()
    for chunk_size in (4, None):
        hl, wl = hidden.clone().requires_grad_(), weight[sl].clone().requires_grad_()
        out = vocab_parallel_linear_cross_entropy(
            hl, wl, tp, padded_bias[sl], label_smoothing=0.1, chunk_size=chunk_size
        )
        out.backward()
        torch.testing.assert_close(out, ref.detach(), **TOL)
        torch.testing.assert_close(hl.grad, hf.grad, **TOL)
        torch.testing.assert_close(wl.grad, wf.grad[sl], **TOL)
    # non-contiguous hidden and weight (transposed views)
    hf, wf = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = mk.linear_cross_entropy(hf, wf, t, z_loss=0.05)
    ref.backward()
    hb, wb = hidden.t().contiguous().requires_grad_(), weight[sl].t().contiguous().requires_grad_()
    out = vocab_parallel_linear_cross_entropy(hb.t(), wb.t(), t, z_loss=0.05, chunk_size=3)
    out.backward()
    torch.testing.assert_close(out, ref.detach(), **TOL)
    torch.testing.assert_close(hb.grad.t(), hf.grad, **TOL)
    torch.testing.assert_close(wb.grad.t(), wf.grad[sl], **TOL)
    # bfloat16 against the single-process op in bfloat16: the loss agrees to one rounding (it came
    # out equal); each logits gradient entry is rounded twice here (kernel, then in-place scale)
    # against once there, and each rank's part of grad_hidden is rounded to bf16 before the
    # all-reduce adds them in bf16: a few roundings of the largest entry apart
    hb, wb = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    hf, wf = hb.clone().requires_grad_(), wb.clone().requires_grad_()
    ref = mk.linear_cross_entropy(hf, wf, t)
    ref.backward()
    hl, wl = hb.clone().requires_grad_(), wb[sl].clone().requires_grad_()
    out = vocab_parallel_linear_cross_entropy(hl, wl, t, chunk_size=4)
    out.backward()
    assert out.dtype == hl.grad.dtype == wl.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.detach(), rtol=2**-8, atol=0)
    for ours, full, part in ((hl.grad, hf.grad, slice(None)), (wl.grad, wf.grad, sl)):
        atol = 4 * 2**-8 * float(full.abs().max())
        torch.testing.assert_close(ours, full[part], rtol=2**-7, atol=atol)


def _expect_error(kind, pattern: str, fn) -> None:
    with pytest.raises(kind, match=pattern):
        fn()


def _check_bad_inputs(rank: int, sizes: list[int]) -> None:
    import maskkern.distributed as mkd
    from maskkern.distributed import vocab_parallel_cross_entropy as vpce
    from maskkern.distributed import vocab_parallel_linear_cross_entropy as vplce

    v, n = sum(sizes), 6
    sl = _slices(sizes, rank)
    x = torch.randn(n, v, dtype=torch.float64)[:, sl]
    t = torch.arange(n) % v
    hidden, weight = torch.ones(n, 4, dtype=torch.float64), torch.ones(v, 4, dtype=torch.float64)[sl]
    # a target outside the whole vocabulary (inside no slice): IndexError on every rank
    _expect_error(IndexError, rf"\[0, {v}\)", lambda: vpce(x, torch.where(t == 0, v, t)))
    _expect_error(IndexError, rf"\[0, {v}\)", lambda: vplce(hidden, weight, torch.where(t == 0, -1, t)))
    # ranks disagreeing on N
    rows = n - 1 if rank == 1 else n
    _expect_error(ValueError, "number of rows N", lambda: vpce(x[:rows], t[:rows]))
    _expect_error(ValueError, "number of rows N", lambda: vplce(hidden[:rows], weight, t[:rows]))
    # slices that do not add up to the vocabulary, class weights of neither length
    _expect_error(ValueError, "add up to", lambda: vpce(x, t, vocab_size=v + 1))
    _expect_error(
        ValueError, "weight must be", lambda: vpce(x, t, torch.ones(v + rank + 1, dtype=torch.float64))
    )
    # ranks disagreeing on the targets, on an option, on H, on hidden
    _expect_error(ValueError, "identical on every rank", lambda: vpce(x, (t + rank) % v))
    _expect_error(ValueError, "label_smoothing", lambda: vpce(x, t, label_smoothing=0.1 * rank))
    wide = torch.ones(weight.shape[0], 4 + rank, dtype=torch.float64)
    _expect_error(
        ValueError, "hidden size", lambda: vplce(torch.ones(n, 4 + rank, dtype=torch.float64), wide, t)
    )
    _expect_error(ValueError, "replicated", lambda: vplce(hidden + rank, weight, t))
    # targets that differ across ranks in a way that order-weighted sums miss (Δ = (1, -2, 1)),
    # one of them out of range on all but rank 0: every rank raises, none waits in a collective;
    # and so even if the targets' hashes collided (forced here): the range check is decided from
    # the gathered table, not from each rank's own targets
    a = v - 1
    t3 = torch.tensor([a, a, a]) if rank == 0 else torch.tensor([a + 1, a - 2, a + 1])
    _expect_error(ValueError, "identical on every rank", lambda: vpce(x[:3], t3))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mkd, "_hash", lambda x, prime, base: torch.zeros((), dtype=torch.long))
        _expect_error(IndexError, rf"\[0, {v}\) .* got {v}", lambda: vpce(x[:3], t3))
    t3 = torch.tensor([2, 2, 2]) if rank == 0 else torch.tensor([3, 0, 3])
    _expect_error(ValueError, "identical on every rank", lambda: vpce(x[:3], t3))
    # one rank's own argument error reaches every rank, with its type
    bad_t = t.double() if rank == 1 else t
    _expect_error(TypeError, "integer tensor" if rank == 1 else "rank 1", lambda: vpce(x, bad_t))
    _expect_error(
        TypeError, "torch.Tensor" if rank == 1 else "rank 1", lambda: vpce(None if rank == 1 else x, t)
    )
    no_hidden = None if rank == 1 else hidden
    _expect_error(TypeError, "torch.Tensor" if rank == 1 else "rank 1", lambda: vplce(no_hidden, weight, t))
    # the group still works afterwards
    out = vpce(x, t, reduction="sum")
    assert torch.isfinite(out)


# --- the worlds ----------------------------------------------------------------------------------


def _check_subgroups(rank: int) -> None:
    """3 ranks: the vocabulary split over the group [1, 2] (group ranks 0, 1, not the world's),
    and rank 0 alone in a group of size 1 holding all of it."""
    from maskkern.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    g12, g0 = dist.new_group([1, 2]), dist.new_group([0])  # every rank creates every group
    group, sl = (g0, slice(0, 9)) if rank == 0 else (g12, _slices([5, 4], rank - 1))
    g = _gen(8)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64)
    t = torch.randint(0, 9, (6,), generator=g)
    t[0] = -100
    hidden = torch.randn(6, 4, generator=g, dtype=torch.float64)
    head = torch.randn(9, 4, generator=g, dtype=torch.float64)
    opts = dict(label_smoothing=0.1, z_loss=0.01)
    xf = x.clone().requires_grad_()
    ref = mk.masked_cross_entropy(xf, t, **opts)
    ref.backward()
    xl = x[:, sl].clone().requires_grad_()
    out = vocab_parallel_cross_entropy(xl, t, group=group, **opts)
    out.backward()
    torch.testing.assert_close(out, ref.detach(), **TOL)
    torch.testing.assert_close(xl.grad, xf.grad[:, sl], **TOL)
    hf, wf = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    ref = mk.linear_cross_entropy(hf, wf, t, **opts)
    ref.backward()
    hl, wl = hidden.clone().requires_grad_(), head[sl].clone().requires_grad_()
    out = vocab_parallel_linear_cross_entropy(hl, wl, t, group=group, chunk_size=2, **opts)
    out.backward()
    torch.testing.assert_close(out, ref.detach(), **TOL)
    torch.testing.assert_close(hl.grad, hf.grad, **TOL)
    torch.testing.assert_close(wl.grad, wf.grad[sl], **TOL)
    # a bad input inside the group [1, 2] is that group's error only
    if rank:
        rows = 5 if rank == 2 else 6
        _expect_error(
            ValueError,
            "number of rows N",
            lambda: vocab_parallel_cross_entropy(xl[:rows], t[:rows], group=group),
        )


def world_losses(rank: int, world: int) -> None:
    sizes = {2: [6, 5], 3: [4, 0, 7]}[world]  # uneven; with 3 ranks one slice is empty
    _check_cross_entropy(rank, sizes)
    _check_linear_cross_entropy(rank, sizes)
    _check_bad_inputs(rank, sizes)
    if world == 3:
        _check_subgroups(rank)


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_losses(world):
    run_world(world, world_losses)


def _check_dtensor_losses(rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from maskkern.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    mesh = init_device_mesh("cpu", (world,))
    n, v, h = 9, 11, 5  # 11 classes over 2 ranks: 6 + 5 (DTensor's uneven split)
    g = _gen(4)
    x = torch.randn(n, v, generator=g, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=g)
    t[3] = -100
    w = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    for reduction in ("mean", "sum", "none"):
        for weight in (None, w):
            # (loss_parallel's backward with class weights fails on ignored targets: none there)
            tt = t if weight is None else t.clamp(min=0)
            theirs = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
            ours = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
            dw = None if weight is None else distribute_tensor(weight, mesh, [Replicate()])
            with loss_parallel():
                ref = F.cross_entropy(theirs, tt, dw, reduction=reduction)
                ref.sum().backward()
                out = vocab_parallel_cross_entropy(ours, tt, dw, reduction=reduction)  # inside loss_parallel
                out.sum().backward()
            assert isinstance(out, DTensor) and out.placements == (Replicate(),)
            assert ours.grad.placements == (Shard(1),)
            torch.testing.assert_close(out.full_tensor(), ref.full_tensor(), **TOL)
            torch.testing.assert_close(ours.grad.full_tensor(), theirs.grad.full_tensor(), **TOL)
    # outside loss_parallel, with label smoothing and z-loss (loss_parallel has neither)
    ours = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
    out = vocab_parallel_cross_entropy(ours, t, label_smoothing=0.2, z_loss=0.1)
    out.backward()
    xf = x.clone().requires_grad_()
    ref = mk.masked_cross_entropy(xf, t, label_smoothing=0.2, z_loss=0.1)
    ref.backward()
    torch.testing.assert_close(out.full_tensor(), ref.detach(), **TOL)
    torch.testing.assert_close(ours.grad.full_tensor(), xf.grad, **TOL)
    # the linear form: the head's weight Shard(0) (ColwiseParallel's), hidden replicated
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    head = torch.randn(v, h, generator=g, dtype=torch.float64)
    dh = distribute_tensor(hidden, mesh, [Replicate()]).requires_grad_()
    dwt = distribute_tensor(head, mesh, [Shard(0)]).requires_grad_()
    out = vocab_parallel_linear_cross_entropy(dh, dwt, t, z_loss=0.05)
    out.backward()
    hf, wf = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    ref = mk.linear_cross_entropy(hf, wf, t, z_loss=0.05)
    ref.backward()
    torch.testing.assert_close(out.full_tensor(), ref.detach(), **TOL)
    torch.testing.assert_close(dh.grad.full_tensor(), hf.grad, **TOL)
    torch.testing.assert_close(dwt.grad.full_tensor(), wf.grad, **TOL)
    with pytest.raises(ValueError, match="Shard"):
        vocab_parallel_cross_entropy(distribute_tensor(x, mesh, [Shard(0)]), t)


def _check_permuted_mesh(rank: int, world: int) -> None:
    """A 1-D mesh listing its ranks out of order: DTensor scatters and gathers its shards in
    group-rank order but computes their offsets from the mesh coordinates, so which slice of the
    vocabulary a rank holds is ambiguous: a clear error on every rank, not a silently wrong loss."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from maskkern.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    mesh = DeviceMesh("cpu", list(reversed(range(world))))
    g = _gen(9)
    x, t = torch.randn(6, 9, generator=g, dtype=torch.float64), torch.randint(0, 9, (6,), generator=g)
    hidden, head = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="out of order"):
        vocab_parallel_cross_entropy(distribute_tensor(x, mesh, [Shard(1)]), t)
    with pytest.raises(ValueError, match="out of order"):
        vocab_parallel_linear_cross_entropy(
            distribute_tensor(hidden, mesh, [Replicate()]), distribute_tensor(head, mesh, [Shard(0)]), t
        )
    # the group still works afterwards
    assert torch.isfinite(vocab_parallel_cross_entropy(x[:, rank : rank + 1], t % world))


def world_dtensor(rank: int, world: int) -> None:
    _check_dtensor_losses(rank, world)
    _check_permuted_mesh(rank, world)
    _check_sharding_rules(rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_losses_and_sharding_rules(world):
    """The DTensor forms against loss_parallel and one process, and the sharding rules of every
    custom op, forward and backward, on 2 and 3 ranks (uneven and empty shards with 3)."""
    run_world(world, world_dtensor)


def _rule_cases():
    """(name, fn, inputs, placements, grad input indices, output placement) per op and layout."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    S0, S1, S2, R = Shard(0), Shard(1), Shard(2), Replicate()
    g = _gen(6)
    B, H, L, D = 4, 3, 5, 3  # every sharded dim at least the mesh size (DTensor replicates smaller ones)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    scores, mask = rnd(B, H, L, L), torch.rand(B, 1, L, L, generator=g) > 0.3
    lengths = torch.tensor([5, 3, 0, 2])
    q, k, v = rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)
    ids = torch.randint(0, 7, (B, L), generator=g)
    ids[0, :2] = 0
    table = rnd(7, D)
    logits, t = rnd(6, 9), torch.randint(0, 9, (6,), generator=g)
    t[1] = -100
    hidden, head = rnd(6, 4), rnd(9, 4)
    return [
        ("masked_softmax batch", lambda s, m, n: mk.masked_softmax(s, m, lengths=n), [scores, mask, lengths],
         [S0, S0, S0], {0}, S0),
        ("masked_softmax heads", lambda s, n: mk.masked_softmax(s, lengths=n, causal=True), [scores, lengths],
         [S1, R], {0}, S1),
        ("masked_softmax rows", lambda s, m: mk.masked_softmax(s, m.float().log(), scale=0.5), [scores, mask],
         [S2, S2], {0}, S2),
        ("attention batch", lambda q, k, v, n: mk.attention(q, k, v, lengths=n, causal=True),
         [q, k, v, lengths], [S0, S0, S0, S0], {0, 1, 2}, S0),
        ("attention heads", lambda q, k, v: mk.attention(q, k, v, window=(2, 0)), [q, k, v], [S1, S1, S1],
         {0, 1, 2}, S1),
        ("attention rows", lambda q, k, v, m: mk.attention(q, k, v, m), [q, k, v, mask], [S2, R, R, S2],
         {0, 1, 2}, S2),
        ("pad_embedding tokens", lambda i, w: mk.pad_embedding(i, w, padding_idx=0), [ids, table], [S0, R],
         {1}, S0),
        ("pad_embedding dim", lambda i, w: mk.pad_embedding(i, w, zero_pad=True, padding_idx=0), [ids, table],
         [R, S1], {1}, S2),
        ("masked_cross_entropy none", lambda x, t: mk.masked_cross_entropy(x, t, reduction="none",
         label_smoothing=0.1), [logits, t], [S0, S0], {0}, S0),
        ("masked_cross_entropy sum", lambda x, t: mk.masked_cross_entropy(x, t, reduction="sum", z_loss=0.1),
         [logits, t], [S0, S0], {0}, Partial()),
        ("linear_cross_entropy sum", lambda h, w, t: mk.linear_cross_entropy(h, w, t, reduction="sum"),
         [hidden, head, t], [S0, R, S0], {0, 1}, Partial()),
        ("linear_cross_entropy none", lambda h, w, t: mk.linear_cross_entropy(h, w, t, reduction="none"),
         [hidden, head, t], [S0, R, S0], {0, 1}, S0),
        # a mean is not a sum of shards: the rule asks for replicated inputs (DTensor gathers them)
        ("masked_cross_entropy mean", lambda x, t: mk.masked_cross_entropy(x, t), [logits, t], [S0, S0], {0},
         R),
    ]  # fmt: skip


def _check_sharding_rules(rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

    import maskkern.distributed as mkd

    assert not mkd.MISSING_OPS, f"rules for ops that are not registered: {mkd.MISSING_OPS}"
    missing = sorted(set(mkd.custom_ops()) - set(mkd.SHARDED_OPS))
    assert not missing, f"maskkern custom ops without a DTensor sharding rule: {missing}"
    mesh = init_device_mesh("cpu", (world,))
    for name, fn, inputs, placements, grad_idx, expected in _rule_cases():
        full = [x.clone().requires_grad_(i in grad_idx) for i, x in enumerate(inputs)]
        ref = fn(*full)
        go = torch.randn(ref.shape, generator=_gen(7), dtype=ref.dtype)
        (ref * go).sum().backward()
        dts = []
        for i, (x, p) in enumerate(zip(inputs, placements, strict=True)):
            d = distribute_tensor(x, mesh, [p])
            dts.append(d.requires_grad_() if i in grad_idx else d)
        out = fn(*dts)
        assert isinstance(out, DTensor) and out.placements == (expected,), (name, out.placements)
        (out.full_tensor() * go).sum().backward()  # differentiable: the gradients come back sharded
        torch.testing.assert_close(out.full_tensor(), ref.detach(), **TOL, msg=lambda m, n=name: f"{n}: {m}")
        for i in grad_idx:
            grad = dts[i].grad
            assert isinstance(grad, DTensor), name
            if placements[i].is_shard():
                assert grad.placements == (placements[i],), (name, i, grad.placements)
            torch.testing.assert_close(
                grad.full_tensor(), full[i].grad, **TOL, msg=lambda m, n=name: f"{n}: {m}"
            )
    # the in-place backward op (autograd uses the out-of-place one for DTensors)
    rows = distribute_tensor(torch.ones(6, 3, dtype=torch.float64), mesh, [Shard(0)])
    valid = distribute_tensor(torch.tensor([True, False, True, True, False, True]), mesh, [Shard(0)])
    scale = distribute_tensor(torch.arange(6, dtype=torch.float64), mesh, [Shard(0)])
    torch.ops.maskkern.masked_cross_entropy_backward_(rows, scale, valid, "cpu")
    expected_rows = torch.ones(6, 3, dtype=torch.float64) * torch.tensor([0, 1, 2, 3, 4, 5.0])[:, None]
    expected_rows[[1, 4]] = 1  # rows that do not count are left as they are
    torch.testing.assert_close(rows.full_tensor(), expected_rows)


class TinyLM(nn.Module):
    """PadEmbedding -> mk.attention (causal, padding lengths) -> head, trained by LinearCrossEntropyLoss."""

    def __init__(self, vocab: int = 13, dim: int = 8, heads: int = 2, fused_head: bool = False) -> None:
        super().__init__()
        self.heads, self.fused_head = heads, fused_head
        self.embed = mk.nn.PadEmbedding(vocab, dim, padding_idx=0)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.loss = mk.nn.LinearCrossEntropyLoss(label_smoothing=0.1)

    def forward(self, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + mk.attention(q, k, v, lengths=(ids != 0).sum(-1), causal=True).transpose(1, 2).reshape(
            b, n, d
        )
        if self.fused_head:  # the head's own method: FSDP2 unshards its weight around it
            return self.head.linear_cross_entropy(x, target)
        return self.loss(x, self.head.weight, target)


def _tiny_batch(rank: int):
    g = _gen(100 + rank)
    ids = torch.randint(1, 13, (2, 6), generator=g)
    ids[0, 4:] = 0
    target = torch.roll(ids, -1, 1).masked_fill(ids == 0, -100)
    return ids, target


def world_fsdp_ddp(rank: int, world: int) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from maskkern.distributed import attach_linear_cross_entropy

    torch.manual_seed(0)
    base = TinyLM().double()
    # one process: the mean over the ranks' batches of their losses (what DDP / FSDP2 average)
    ref = TinyLM().double()
    ref.load_state_dict(base.state_dict())
    sum(ref(*_tiny_batch(r)) for r in range(world)).div(world).backward()
    expected = {name: p.grad for name, p in ref.named_parameters()}

    ddp_model = TinyLM().double()
    ddp_model.load_state_dict(base.state_dict())
    ddp = DistributedDataParallel(ddp_model)
    ddp(*_tiny_batch(rank)).backward()
    for name, p in ddp_model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], **TOL, msg=lambda m, n=name: f"DDP {n}: {m}")

    for fused in (False, True):
        model = TinyLM(fused_head=fused).double()
        model.load_state_dict(base.state_dict())
        fully_shard(model.embed)
        if fused:  # the head sharded on its own: the loss must run as one of its forward methods
            fully_shard(model.head)
            attach_linear_cross_entropy(model.head, model.loss)
        fully_shard(model)
        for _ in range(2):  # the second step checks that resharding after the first went right
            for p in model.parameters():
                p.grad = None
            model(*_tiny_batch(rank)).backward()
        for name, p in model.named_parameters():
            what = f"FSDP2 fused={fused} {name}"
            torch.testing.assert_close(
                p.grad.full_tensor(), expected[name], **TOL, msg=lambda m, w=what: f"{w}: {m}"
            )
    # attached before fully_shard(head): FSDP2 would not unshard the weight around the method
    model = TinyLM(fused_head=True).double()
    attach_linear_cross_entropy(model.head, model.loss)
    fully_shard(model.head)
    fully_shard(model)
    with pytest.raises(RuntimeError, match=r"before fully_shard .* after fully_shard\(head\)"):
        model(*_tiny_batch(rank))


def test_fsdp2_and_ddp_tiny_model():
    run_world(2, world_fsdp_ddp)


# --- in this process -----------------------------------------------------------------------------


def test_agreement_device_is_the_groups():
    """The agreement gather's device depends on the group's backend only, never on a rank's
    inputs: a rank whose logits are not a tensor meets the others on the same backend (a CPU
    tensor on an NCCL group would leave them waiting)."""
    from maskkern.distributed import _agreement_device

    assert _agreement_device("gloo") == torch.device("cpu")
    assert _agreement_device("nccl") == torch.device("cuda")
    assert _agreement_device("cpu:gloo,cuda:nccl") == torch.device("cpu")
    assert _agreement_device("cuda:nccl") == torch.device("cuda")


def test_target_hashes_tell_apart_what_weighted_sums_do_not():
    from maskkern.distributed import _HASHES, _hash

    a = torch.tensor([5, 5, 5])
    swapped = torch.arange(2000)
    swapped[[0, 1009]] = swapped[[1009, 0]]  # equal weights under weights of period 1009
    pairs = [
        (a, torch.tensor([6, 3, 6])),  # Δ = (1, -2, 1): equal sums, equal index-weighted sums
        (torch.tensor([1, 2, 3, 4]), torch.tensor([2, 1, 4, 3])),  # swapped neighbours
        (torch.tensor([0, -100, 7]), torch.tensor([0, 7, -100])),  # ignored rows moved
        (torch.arange(2000), swapped),
    ]
    for x, y in pairs:
        assert all(int(_hash(x, *h)) != int(_hash(y, *h)) for h in _HASHES), (x, y)
    assert int(_hash(a, *_HASHES[0])) == int(_hash(a.int(), *_HASHES[0]))
    assert int(_hash(torch.empty(0, dtype=torch.long), *_HASHES[0])) == 0
