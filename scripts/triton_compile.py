"""Compiles every Triton kernel of maskkern for a Hopper GPU (sm_90) on a machine without a GPU.

The tests run the Triton kernels in Triton's interpreter (TRITON_INTERPRET=1), which accepts code
that the compiler rejects. This script calls the launchers in triton_kernels/ with CPU tensors and
a driver that only compiles: each specialization they ask for goes through Triton's whole pipeline
(ttir, ttgir, llir, ptx, then ptxas to a cubin) and nothing is launched. It prints one line per
compiled kernel with its registers, stack and local (spilled) bytes per thread and shared memory,
read from the cubin with the cuobjdump that Triton ships, and exits 1 if any case fails to compile.

    python scripts/triton_compile.py [--jobs N] [--only SUBSTRING]

The cases cover each kernel's compile-time switches (dtype, mask kind, causal, lengths, whole or
chunked rows, 32- or 64-bit row indices, ...) at least once, not every combination.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Before triton is imported: this compiles, the interpreter would not.
os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import jit
from triton.runtime.driver import driver

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _CompileOnlyDriver:
    """What JITFunction.run asks of the active driver before it compiles; it is never asked to
    launch, because every launch goes through ``_compile_only`` below with warmup=True."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return TARGET


_compiled: list = []


def _compile_only(self: jit.JITFunction, grid: object):
    """Stands in for ``kernel[grid]``: compiles for TARGET (warmup=True launches nothing)."""

    def compile_(*args, **kwargs):
        _compiled.append(self.run(*args, grid=grid, warmup=True, **kwargs))

    return compile_


def _softmax_cases() -> list[tuple[str, Callable[[], None]]]:
    from maskkern.triton_kernels import masked_softmax as ms

    def masks(x: torch.Tensor) -> dict:
        bool_mask = torch.rand(2, 1, 5, x.shape[-1]) > 0.3
        return {None: None, "bool": bool_mask.expand_as(x), "add": torch.randn_like(x[:1]).expand_as(x)}

    cases = []
    # (mask kind, causal, lengths, query_lengths): every value of each switch at least once.
    switches = [
        (None, 0, False, False),
        ("bool", 1, True, False),
        ("add", 2, False, True),
        ("bool", 0, True, True),
    ]
    for dtype in DTYPES:
        for lk in (70, 20000):  # a whole row in registers / a row in chunks (over the 64 KiB cap)
            for kind, causal, has_len, has_qlen in switches:

                def case(dtype=dtype, lk=lk, kind=kind, causal=causal, has_len=has_len, has_qlen=has_qlen):
                    x = torch.randn(2, 3, 5, lk).to(dtype)
                    mask = masks(x)[kind]
                    lens = torch.tensor([3, lk]) if has_len else None
                    qlens = torch.tensor([5, 2]) if has_qlen else None
                    out = ms.masked_softmax_fwd(x, mask, lens, qlens, causal, 0.5)
                    ms.masked_softmax_bwd(torch.randn_like(out), out, mask, lens, qlens, causal, 0.5)

                flags = f"mask={kind} causal={causal} lengths={has_len} qlens={has_qlen}"
                cases.append((f"masked_softmax {dtype} Lk={lk} {flags}", case))

    def int64_rows():
        # More than 2**31 rows: the row index is 64-bit. One element, broadcast: nothing runs.
        huge = torch.empty(1).expand(2**16, 2**10, 2**6, 70)
        geometry = (huge, None, None, 1, 1.0)
        ms._launch(
            ms._fwd_rows_kernel, ms._fwd_long_kernel, (huge, huge, None, 0, 0, 0, 0), *geometry, MASK_KIND=0
        )
        ms._launch(ms._bwd_rows_kernel, ms._bwd_long_kernel, (huge, huge, huge), *geometry)

    cases.append(("masked_softmax float32 rows > 2**31 (int64 row index)", int64_rows))
    return cases


def _cross_entropy_cases() -> list[tuple[str, Callable[[], None]]]:
    from maskkern._dtypes import compute_dtype
    from maskkern.triton_kernels import masked_cross_entropy as ce

    cases = []
    for dtype in DTYPES:
        for c in (70, 20000):
            # (class weights and gradient scales, gradient written, label smoothing)
            for weighted, with_grad, smoothing in (
                (False, True, 0.0),
                (True, True, 0.1),
                (False, False, 0.0),
            ):
                flags = f"weighted={weighted} grad={with_grad} smoothing={smoothing}"

                def case(dtype=dtype, c=c, weighted=weighted, with_grad=with_grad, smoothing=smoothing):
                    cdt = compute_dtype(dtype)
                    logits = torch.randn(4, c).to(dtype)
                    target = torch.tensor([0, 1, c - 1, 2])
                    valid = torch.tensor([True, False, True, True])
                    weight = torch.rand(c, dtype=cdt) if weighted else None
                    scale = torch.ones(2, dtype=cdt) if weighted else None
                    grad = torch.empty_like(logits) if with_grad else None
                    ce.masked_cross_entropy_fwd(logits, target, valid, weight, smoothing, 0.01, scale, grad)
                    if with_grad:  # the backward's scale: one factor per row, or one for all
                        factors = torch.rand(4 if weighted else 1, dtype=cdt)
                        ce.masked_cross_entropy_scale_(grad, valid, factors)

                cases.append((f"masked_cross_entropy {dtype} C={c} {flags}", case))
    return cases


def _pad_embedding_cases() -> list[tuple[str, Callable[[], None]]]:
    from maskkern.triton_kernels import pad_embedding as pe

    cases = []
    for dtype in DTYPES:
        for d in (24, 3000):  # one column block / several
            for flags in (False, True):  # zero_pad with a scale, scale_grad_by_freq
                name = f"pad_embedding {dtype} D={d} zero_pad+scale/freq={flags}"

                def case(dtype=dtype, d=d, flags=flags):
                    weight = torch.randn(10, d).to(dtype)
                    ids = torch.tensor([1, 0, 9, 0, 3])
                    out = pe.pad_embedding_fwd(ids, weight, 0, flags, 2.0 if flags else 1.0)
                    pe.pad_embedding_bwd(torch.randn_like(out), ids, 10, 0, flags, 1.0)

                cases.append((name, case))
    return cases


def _attention_cases() -> list[tuple[str, Callable[[], None]]]:
    from maskkern.triton_kernels import attention as at

    def tiles_of(mask: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
        B, H, Lq, Lk = mask.shape
        return torch.ones(B, H, triton.cdiv(Lq, bq), triton.cdiv(Lk, bk), dtype=torch.int8)

    # (mask kind, causal, (window_left, window_right), lengths, query_lengths, packed, GQA group):
    # every value of each switch at least once; the heaviest combinations at every head dim.
    switches = [
        ("bool", 1, (64, -1), True, False, False, 2),
        ("add", 2, (-1, 32), False, True, False, 1),
        (None, 2, (48, 16), False, False, True, 4),
        (None, 0, (-1, -1), False, False, False, 1),
    ]
    # (D, Dv, switch sets): the three heavy sets at each head-dim block (64, 128, 256), one at an
    # odd D and at Dv != D, the plain one (no mask, causal, window or lengths) once
    dims = [(64, 64, switches), (128, 128, switches[:3]), (256, 256, switches[:3])]
    dims += [(80, 80, switches[:1]), (64, 128, switches[1:2])]
    cases = []
    for dtype in DTYPES:
        for d, dv, sets in dims:
            for kind, causal, window, has_len, has_qlen, packed, group in sets:

                def case(dtype=dtype, d=d, dv=dv, kind=kind, causal=causal, window=window,
                         has_len=has_len, has_qlen=has_qlen, packed=packed, group=group):  # fmt: skip
                    B, Hkv, Lq, Lk = (1, 2, 300, 300) if packed else (2, 2, 200, 260)
                    Hq = Hkv * group
                    q = torch.randn(B, Lq, Hq, d).to(dtype).transpose(1, 2)
                    k = torch.randn(B, Lk, Hkv, d).to(dtype).transpose(1, 2)
                    v = torch.randn(B, Lk, Hkv, dv).to(dtype).transpose(1, 2)
                    bq, bk = at.attention_blocks(d, dtype)
                    mask = tiles = None
                    if kind == "bool":
                        mask = (torch.rand(B, 1, Lq, Lk) > 0.3).expand(B, Hq, Lq, Lk)
                        tiles = tiles_of(mask, bq, bk)
                    elif kind == "add":
                        mask = torch.randn(1, Hq, Lq, Lk).to(dtype).expand(B, Hq, Lq, Lk)
                    lens = torch.tensor([Lk, 100]) if has_len else None
                    qlens = torch.tensor([Lq, 50]) if has_qlen else None
                    cu = torch.tensor([0, 100, 300]) if packed else None
                    max_q, max_k = (200, 200) if packed else (Lq, Lk)
                    geometry = (lens, qlens, cu, cu, max_q, max_k, causal, *window, d**-0.5, bq, bk)
                    out, lse = at.attention_fwd(q, k, v, mask, tiles, *geometry)
                    at.attention_bwd(torch.randn_like(out), q, k, v, out, lse, mask, tiles, *geometry)

                flags = (
                    f"mask={kind} causal={causal} window={window} lengths={has_len} qlens={has_qlen} "
                    f"packed={packed} group={group}"
                )
                cases.append((f"attention {dtype} D={d} Dv={dv} {flags}", case))
    return cases


CASES = _softmax_cases() + _cross_entropy_cases() + _pad_embedding_cases() + _attention_cases()


def _resource_usage(cubin: bytes) -> str:
    """'REG:62 STACK:0 SHARED:1024 LOCAL:0' for the one kernel in ``cubin``."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
    line = next((ln for ln in dump.stdout.splitlines() if "REG:" in ln), dump.stdout + dump.stderr)
    wanted = ("REG", "STACK", "SHARED", "LOCAL")
    return " ".join(field for field in line.split() if field.split(":")[0] in wanted)


def _enter_compile_only_mode() -> None:
    """Each worker's initializer: kernel[grid](...) compiles for TARGET from now on."""
    driver.set_active(_CompileOnlyDriver())
    jit.JITFunction.__getitem__ = _compile_only


def _run_case(index: int) -> tuple[str, list[str], str | None]:
    """(case name, one line per kernel it compiled, the error or None)."""
    name, case = CASES[index]
    _compiled.clear()
    try:
        case()
    except Exception:
        return name, [], traceback.format_exc()
    usage = [(k.metadata.name, k.metadata.num_warps, _resource_usage(k.asm["cubin"])) for k in _compiled]
    return name, [f"  {kernel:<22} warps={warps:<2} {regs}" for kernel, warps, regs in usage], None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="cases compiled in parallel")
    parser.add_argument("--only", default="", help="compile only the cases whose name contains this")
    args = parser.parse_args()
    selected = [index for index, (name, _) in enumerate(CASES) if args.only in name]
    print(f"triton {triton.__version__}, torch {torch.__version__}, target {TARGET}", flush=True)
    failed = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), initializer=_enter_compile_only_mode) as pool:
        for name, lines, error in pool.map(_run_case, selected):
            print(("FAILED " if error else "") + name, *lines, sep="\n", flush=True)
            if error:
                failed += 1
                print(error, flush=True)
    print(f"{len(selected) - failed} of {len(selected)} cases compiled for sm_90", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
