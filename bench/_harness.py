"""The benchmark harness shared by every ``bench/bench_<op>.py``: timing, correctness, memory, GB/s,
and the outputs (markdown tables, CSV, PNG plots, SUMMARY.md).

A bench script is a module with three names; ``bench/run.py`` discovers ``bench/bench_*.py`` and runs
them all, and each script also runs alone (``python bench/bench_<op>.py [--quick]``)::

    KERNEL = "masked_softmax"                       # the op's one name (CSV `kernel`, file names)

    def cases(ctx: Context) -> list[Case]:          # what to measure (ctx.quick: a short list)
        ...

    def targets(ctx: Context, results: dict[str, CaseResult]) -> list[Target]:   # optional
        ...                                         # headline rows for SUMMARY.md

    if __name__ == "__main__":
        raise SystemExit(main([sys.modules[__name__]]))

A ``Case`` is one input configuration: ``inputs()`` builds the tensors on ``ctx.device`` (lazily,
seeded), ``providers`` maps a name to a callable ``fn(**inputs) -> Tensor``, ``reference`` is the
semantics oracle (``maskkern.reference``). ``ctx.providers(maskkern=..., eager=..., **peers)`` builds
the standard set: ``maskkern`` (the device's default backend) and on GPU ``maskkern-<backend>`` for
each other available backend — on CPU ``maskkern-nocache``, the same ``cpu`` backend with its output
cache bypassed for the whole call (``maskkern.memory``: what the cache is worth) — ``eager`` (the
eager expression) and ``compile`` (``torch.compile`` of that same eager function), then any peers
(``sdpa``, ``liger``, ``apex``) passed when importable.

Method, per case:
1. Correctness first: every provider runs once and its output (and, for ``fwd+bwd``, the gradients of
   ``grad_inputs`` for a fixed random output gradient) is compared with the reference at the
   per-dtype tolerance of the tests; the table says ✓ or the max abs error. A provider that raises
   is reported and skipped, the run goes on.
2. Time, per mode: ``fwd`` (under ``torch.no_grad``), ``fwd+bwd`` (forward, then backward of the
   fixed random gradient; each call first sets ``.grad`` to None, freeing the provider's own
   gradient of its last call, as ``zero_grad(set_to_none=True)`` does in a training loop: the
   gradients of each provider are kept aside, untimed, while the others run, so that no provider
   pays for freeing another's) or ``step`` (the callable as it
   is, e.g. a training step). CPU: warm-up, then providers interleaved A B A B ... for several
   rounds; each sample times enough back-to-back calls to last ``min_sample_s``; p50/p20/p80 of the
   per-call times; the thread count is fixed (``--threads``) and recorded. GPU: the same
   interleaving, one call per sample between CUDA events, L2 flushed (a 256 MB read) before each.
3. Peak memory: bytes allocated above what is live before the call (the inputs) during one call —
   outputs, saved activations, temporaries and grads. GPU: ``torch.cuda.max_memory_allocated``;
   CPU: the allocation events of ``torch.profiler(profile_memory=True)``, summed in time order.
4. GB/s = ``Case.bytes[mode]`` / p50: the compulsory traffic, each tensor counted once at its dtype
   (broadcast masks at their real storage; masked tails that need not be read not counted; the
   script states its model), for every provider; % copy = of the machine's copy bandwidth, measured
   once per run by a large ``copy_`` (bytes read + written).

Outputs in ``--out`` (default ``bench/results/<device-slug>/``; ``--quick`` runs go to the git-ignored
``bench/results/tmp/``): ``<kernel>.md`` (the table, also printed), ``<kernel>.csv`` (one row per
measurement: CSV_COLUMNS; metrics ``time`` ms, ``gbps`` GB/s, ``memory`` MB, ``error`` max abs
error), ``<kernel>_<plot>.png`` (time and GB/s against the swept ``x``, one line per provider, a
panel per mode) and, from the runner, ``SUMMARY.md`` (the targets: measured, required, pass/fail).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

import maskkern
from maskkern.testing import TOL  # (rtol, atol) of a provider against the reference, as in the tests

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODES = ("fwd", "fwd+bwd", "step")
CSV_COLUMNS = (
    "kernel",
    "provider",
    "mode",
    "metric",
    "unit",
    "x_name",
    "x",
    "p50",
    "p20",
    "p80",
    "config",
    "device",
    "versions",
    "timestamp",
)

# The compile baseline must stay compiled across a sweep's shapes and the no_grad/grad variants:
# past the default recompile limit dynamo silently falls back to eager and the comparison would be
# a lie. Raise the limit, and make hitting it an error that the table reports.
torch._dynamo.config.recompile_limit = 1024
torch._dynamo.config.accumulated_recompile_limit = 4096
torch._dynamo.config.fail_on_recompile_limit_hit = True


# --- what a script declares ---------------------------------------------------------------------


@dataclass
class Case:
    """One input configuration of one op, measured for every provider and mode.

    Args:
        name: unique within the kernel; the table's row label (e.g. "L=512 pad=50% causal").
        x_name, x: the swept variable and its value here (CSV columns, plot x axis).
        config: JSON-serialisable description (shape, dtype, ...): the CSV ``config`` column.
        inputs: builds the keyword arguments of the providers on the device (called seeded).
        providers: name -> ``fn(**inputs) -> Tensor``; names starting "maskkern" are maskkern's.
        reference: the oracle ``fn(**inputs) -> Tensor``; None skips the check (shown "—").
        grad_inputs: names of the inputs that get gradients in ``fwd+bwd``.
        modes: a subset of MODES.
        bytes: mode -> compulsory bytes moved (for GB/s); absent modes get no GB/s.
        plot: cases of a kernel with the same ``plot`` form one figure (default: ``x_name``).
        tol: (rtol, atol) overriding the per-dtype TOL of the reference output.
        baselines: names of providers that compute another configuration on purpose (e.g. maskkern
            at 0% padding in a 50% case): timed in the same interleaved rounds, so that their ratio to
            maskkern is measured in one run, but not checked against this case's reference (the case
            of their own configuration checks them).
    """

    name: str
    x_name: str
    x: Any
    config: dict[str, Any]
    inputs: Callable[[], dict[str, Any]]
    providers: dict[str, Callable[..., Tensor]]
    reference: Callable[..., Tensor] | None = None
    grad_inputs: tuple[str, ...] = ()
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    bytes: dict[str, int] = field(default_factory=dict)
    plot: str | None = None
    tol: tuple[float, float] | None = None
    baselines: tuple[str, ...] = ()


# The baseline of the "pays" targets (time at 50% padding or ignored / at 0%): maskkern at 0%,
# timed as a baseline provider of the 50% case, so that the ratio is measured in one run.
AT_ZERO = "maskkern at 0%"


def at_zero(
    ctx: Context, maskkern: Callable[[str], Callable[..., Tensor]], **fixed: Any
) -> Callable[..., Tensor]:
    """maskkern (its default backend, output cache on) on the case's inputs with ``fixed`` in place of
    the ones that mask (e.g. lengths = L, or a target with nothing ignored)."""
    fn = maskkern(ctx.maskkern_backends(nocache=False)[0][1])

    def baseline(**inputs: Any) -> Tensor:
        return fn(**(inputs | fixed))

    return baseline


def pays(result: CaseResult | None, mode: str = "fwd+bwd") -> float | None:
    """maskkern's time in ``result`` / the AT_ZERO baseline's, measured in the same rounds."""
    return result and ratio(result.p50("maskkern", mode), result.p50(AT_ZERO, mode))


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing (for targets built from two cases)."""
    return None if a is None or b is None else a / b


@dataclass
class Measurement:
    """Per-call time quantiles in ms, peak memory in bytes (None if not measured), GB/s."""

    p50: float
    p20: float
    p80: float
    peak_bytes: int | None = None
    gbps: float | None = None


@dataclass
class CaseResult:
    """What a case produced: ``times[(provider, mode)]``, ``errors[provider]`` (the exception text
    of a provider that raised), ``check[provider]`` = (passed, max abs error) against the reference."""

    case: Case
    times: dict[tuple[str, str], Measurement] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    check: dict[str, tuple[bool, float]] = field(default_factory=dict)

    def p50(self, provider: str, mode: str) -> float | None:
        """Median ms of ``provider`` in ``mode``, None if it did not run."""
        m = self.times.get((provider, mode))
        return None if m is None else m.p50

    def ratio(self, peer: str, mode: str, provider: str = "maskkern") -> float | None:
        """time(peer) / time(provider): > 1 means ``provider`` is faster."""
        return ratio(self.p50(peer, mode), self.p50(provider, mode))


@dataclass
class Target:
    """A headline row of SUMMARY.md: ``measured <op> required`` passes (op is ">=" or "<=")."""

    name: str
    measured: float | None
    required: float
    op: str = ">="
    unit: str = "×"

    @property
    def passed(self) -> bool | None:
        if self.measured is None or math.isnan(self.measured):
            return None
        return self.measured >= self.required if self.op == ">=" else self.measured <= self.required


def compiled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``torch.compile`` of the eager function, static shapes (its best case; compiled on first use,
    which the warm-up absorbs)."""
    return torch.compile(fn, dynamic=False)


# --- the machine --------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """Human name: the GPU's, or the CPU model with the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """Directory name under bench/results/: e.g. ``cpu-amd-epyc-2t``, ``nvidia-h100-80gb-hbm3``."""
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return f"cpu-{_slug(_cpu_name())}-{torch.get_num_threads()}t"


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def load_note(load: float | None) -> str:
    """The 1-minute load average, with a warning when other work competes for the cores."""
    if load is None:
        return ""
    busy = load > (os.cpu_count() or 1) * 0.5
    warning = " — **the machine was busy: other processes competed for the cores; times are unreliable**"
    return f"load average {load:.1f} on {os.cpu_count()} cores at the start{warning if busy else ''}"


def versions() -> str:
    """torch / triton / maskkern (git describe) / python / threads, for every CSV row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        git = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    return (
        f"torch {torch.__version__}; triton {triton_version}; maskkern {maskkern.__version__}"
        f"{'+' + git if git else ''}; python {platform.python_version()}; threads {torch.get_num_threads()}"
    )


# --- timing and memory --------------------------------------------------------------------------


@dataclass
class Budget:
    """How long to measure: warm-up calls, rounds of the A B A B interleaving (adapted between
    min_reps and max_reps to fit budget_s per case and mode), and the CPU sample length."""

    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float
    min_sample_s: float


QUICK = Budget(warmup=2, min_reps=3, max_reps=10, budget_s=0.5, min_sample_s=0.005)
FULL = Budget(warmup=3, min_reps=7, max_reps=40, budget_s=2.0, min_sample_s=0.02)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) of the samples."""
    q = torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    return tuple(float(v) for v in torch.tensor(samples, dtype=torch.float64).quantile(q))


class GradSlots:
    """fwd+bwd: the leaves' ``.grad`` of each provider, kept aside while the others run.

    ``switch(name)``, untimed before a provider's calls, puts the grads of the provider that ran
    last aside and gives the leaves back this provider's own, which its next call frees. Without it
    each provider freed the gradient the provider before it left: in the interleaved order,
    maskkern's cached 32 MiB gradient was freed by a provider of the OS allocator for free, and
    maskkern paid the munmap of that provider's (5-6 ms of an 11 ms fwd+bwd at the softmax headline).
    """

    def __init__(self, leaves: list[Tensor]) -> None:
        self.leaves = leaves
        self.slots: dict[str, list[Tensor | None]] = {}
        self.current: str | None = None

    def switch(self, name: str) -> None:
        if self.current is not None:
            self.slots[self.current] = [t.grad for t in self.leaves]
        for t, g in zip(self.leaves, self.slots.pop(name, [None] * len(self.leaves)), strict=True):
            t.grad = g
        self.current = name

    def clear(self) -> None:
        self.slots.clear()
        self.current = None
        for t in self.leaves:
            t.grad = None


# Each sample starts after a read of this many bytes, a few times the last-level cache (CPU) or
# the L2 (GPU; 50-60 MB on an H100/H200): whatever the provider before left dirty in the caches is
# written back then, untimed, and every provider starts from the same clean, cold caches. Without
# it, a provider paid for the writeback of its predecessor's outputs: up to 1.6 ms on the first
# call of a softmax sample after eager's ~100 MB (maskkern's own streamed outputs leave no dirty
# lines behind). A read, not do_bench's zero_(): a write would leave the L2 full of dirty lines
# for the timed call to write back.
CPU_FLUSH_BYTES = 64 << 20
GPU_FLUSH_BYTES = 256 << 20


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    budget: Budget,
    switch: Callable[[str], None] = lambda name: None,
) -> dict[str, tuple[float, float, float]]:
    """p50/p20/p80 ms per call of each fn, measured in interleaved rounds (A B A B ...) so that
    drifts of clock, cache and neighbours hit every provider alike; switch(name) runs untimed
    before each provider's calls."""
    est: dict[str, float] = {}
    for name, fn in fns.items():
        switch(name)
        for _ in range(budget.warmup):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        est[name] = max(time.perf_counter() - t0, 1e-7)
    on_gpu = device.type == "cuda"
    inner = {n: 1 if on_gpu else max(1, math.ceil(budget.min_sample_s / t)) for n, t in est.items()}
    round_s = sum(inner[n] * est[n] for n in fns)
    # A GPU sample is one call, often microseconds: take more of them, as do_bench does.
    lo, hi = (10, 5 * budget.max_reps) if on_gpu else (budget.min_reps, budget.max_reps)
    reps = int(min(hi, max(lo, budget.budget_s / round_s)))
    flush = torch.ones((GPU_FLUSH_BYTES if on_gpu else CPU_FLUSH_BYTES) // 4, device=device)
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            switch(name)
            flush.sum()
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                for _ in range(inner[name]):
                    fn()
                samples[name].append((time.perf_counter() - t0) * 1e3 / inner[name])
    return {n: _quantiles(s) for n, s in samples.items()}


@contextlib.contextmanager
def _stderr_silenced():
    """Kineto logs two lines to fd 2 per profiler session; the progress bar shares that stream."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated above the live ones during one call of ``fn`` (see the module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # a collection inside the call would show as frees the call did not make
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


def copy_bandwidth(device: torch.device, budget: Budget) -> float:
    """GB/s of ``dst.copy_(src)`` on buffers far larger than the caches (bytes read + written)."""
    n = (1 << 30 if device.type == "cuda" else 256 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    p50 = time_interleaved({"copy": lambda: dst.copy_(src)}, device, budget)["copy"][0]
    return 2 * src.nbytes / (p50 * 1e-3) / 1e9


# --- running a case -----------------------------------------------------------------------------


def _mode_fn(fn: Callable[..., Tensor], inputs: dict[str, Any], mode: str, leaves: list[Tensor], grad):
    """A zero-argument callable that runs one ``mode`` call of ``fn``."""
    if mode == "fwd":

        def call() -> None:
            with torch.no_grad():
                fn(**inputs)

    elif mode == "fwd+bwd":

        def call() -> None:
            for t in leaves:
                t.grad = None
            fn(**inputs).backward(grad)

    else:

        def call() -> None:
            fn(**inputs)

    return call


# maskkern's cpu backend with its output cache off during the whole call, backward included.
NO_CACHE = "maskkern-nocache"


def _cache_off(call: Callable[[], None]) -> Callable[[], None]:
    """``call`` with the cache bypassed."""

    def off() -> None:
        with maskkern.memory.cache_bypassed():
            call()

    return off


def _outputs(out: Tensor, leaves: list[Tensor], grad: Tensor | None) -> list:
    """The output and, when ``grad`` is given, the gradients of the leaves, detached."""
    if grad is None:
        return [out.detach()]
    return [out.detach(), *torch.autograd.grad(out, leaves, grad, allow_unused=True)]


def _max_error(actual: list, expected: list, tol: tuple[float, float] | None) -> tuple[bool, float]:
    """(all within tolerance, max abs error); the error is NaN where NaNs differ, inf where shapes
    or the presence of a gradient differ."""
    ok, err = True, 0.0
    for a, e in zip(actual, expected, strict=True):
        if a is None or e is None or a.shape != e.shape:
            if not (a is None and e is None):
                ok, err = False, math.inf
            continue
        rtol, atol = tol or TOL.get(e.dtype, (0.0, 0.0))
        # In float64, in chunks: a whole copy of a GPU cross-entropy gradient (2^31 elements)
        # would be 16 GiB per tensor.
        for a_part, e_part in zip(
            a.reshape(-1).split(CHECK_CHUNK), e.reshape(-1).split(CHECK_CHUNK), strict=True
        ):
            a64, e64 = a_part.double(), e_part.to(a.device).double()
            if not torch.equal(a64.isnan(), e64.isnan()):
                ok, err = False, math.nan
                break
            diff = (a64 - e64).abs().nan_to_num(0.0)
            if not math.isnan(err) and diff.numel():
                err = max(err, float(diff.max()))
            ok = ok and torch.allclose(a64, e64, rtol, atol, equal_nan=True)
    return ok, err


CHECK_CHUNK = 1 << 26  # elements compared at a time by _max_error (512 MiB in float64)


def _prepare(case: Case) -> tuple[dict[str, Any], list[Tensor], Tensor | None, list | None]:
    """Seeded inputs, the grad leaves, the fixed random output gradient (fwd+bwd) and the
    reference's output and gradients (None without a reference)."""
    torch.manual_seed(0)
    inputs = case.inputs()
    leaves = [inputs[n] for n in case.grad_inputs]
    with_grad = "fwd+bwd" in case.modes
    for t in leaves:
        t.requires_grad_(with_grad)
    out = (case.reference or next(iter(case.providers.values())))(**inputs)
    grad = torch.randn_like(out) if with_grad else None
    expected = None if case.reference is None else _outputs(out, leaves, grad)
    return inputs, leaves, grad, expected


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]


class Context:
    """One run: the device, the measuring budget, the forced backend, where outputs go; measures
    the copy bandwidth once and runs cases."""

    def __init__(
        self, device: torch.device, quick: bool, backend: str | None, out_dir: Path, plots: bool = True
    ) -> None:
        self.device, self.quick, self.backend = device, quick, backend
        self.out_dir, self.plots = out_dir, plots
        self.budget = QUICK if quick else FULL
        self.device_name = device_name(device)
        self.versions = versions()
        self.timestamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self._copy_gbps: float | None = None
        self.load_at_start = _load_average()

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def checks_values(self) -> bool:
        """Whether maskkern's checks of input values (pad_embedding's ``check_ids``, masked_softmax's
        ``check_lengths``) run: on CPU, where eager checks too; not on GPU, where they synchronise
        with the host and the eager expressions do not (their masks never do, F.embedding asserts
        on the device)."""
        return not self.on_gpu

    @property
    def copy_gbps(self) -> float:
        """The machine's measured copy bandwidth (GB/s), measured once per run on first use."""
        if self._copy_gbps is None:
            self._copy_gbps = copy_bandwidth(self.device, self.budget)
        return self._copy_gbps

    def maskkern_backends(self, nocache: bool = True) -> list[tuple[str, str]]:
        """(provider name, backend): the device's default as ``maskkern``, then on GPU
        ``maskkern-<backend>`` for every other available backend, on CPU ``maskkern-nocache`` unless
        ``nocache`` is False (for ops whose large buffers are not maskkern's outputs); ``--backend``
        forces one."""
        if self.backend is not None:
            return [("maskkern", self.backend)]
        status = maskkern.backends()
        order = ("triton", "cuda") if self.on_gpu else ("cpu",)
        found = [b for b in order if status[b].available] or ["torch"]
        extra = [(NO_CACHE, "cpu")] if nocache and found[0] == "cpu" else []
        return [("maskkern", found[0])] + [(f"maskkern-{b}", b) for b in found[1:]] + extra

    def providers(
        self,
        maskkern: Callable[[str], Callable[..., Tensor]],
        eager: Callable[..., Tensor],
        nocache: bool = True,
        **peers: Callable[..., Tensor] | None,
    ) -> dict[str, Callable[..., Tensor]]:
        """The standard providers: ``maskkern(backend)`` for each of maskkern_backends(nocache), ``eager``,
        ``compile`` = compiled(eager), then the peers that are not None (pass None when a peer is not
        importable or does not apply here)."""
        out = {name: maskkern(backend) for name, backend in self.maskkern_backends(nocache)}
        out["eager"] = eager
        out["compile"] = compiled(eager)
        out.update({k: v for k, v in peers.items() if v is not None})
        return out

    def run_case(self, case: Case, on_mode: Callable[[str], None] = lambda mode: None) -> CaseResult:
        """Check, then time and measure every provider in every mode of ``case``. A case whose
        inputs or reference raise is reported under ``errors["case"]``; the run goes on."""
        result = CaseResult(case)
        try:
            inputs, leaves, grad, expected = _prepare(case)
        except Exception as exc:
            result.errors["case"] = _error_text(exc)
            for mode in case.modes:
                on_mode(mode)
            return result
        providers = dict(case.providers)
        for name, fn in list(providers.items()):
            try:
                if expected is None or name in case.baselines:
                    fn(**inputs)
                else:
                    result.check[name] = _max_error(_outputs(fn(**inputs), leaves, grad), expected, case.tol)
            except Exception as exc:
                result.errors[name] = _error_text(exc)
                del providers[name]
        for mode in case.modes:
            on_mode(mode)
            for t in leaves:
                t.requires_grad_(mode == "fwd+bwd")
            calls = {n: _mode_fn(fn, inputs, mode, leaves, grad) for n, fn in providers.items()}
            if NO_CACHE in calls:
                calls[NO_CACHE] = _cache_off(calls[NO_CACHE])
            grads = GradSlots(leaves if mode == "fwd+bwd" else [])
            try:
                stats = time_interleaved(calls, self.device, self.budget, grads.switch)
            except Exception:  # one provider failing in this mode: time the others alone
                stats = {}
                for name, call in calls.items():
                    grads.clear()
                    try:
                        stats.update(time_interleaved({name: call}, self.device, self.budget, grads.switch))
                    except Exception as exc1:
                        result.errors.setdefault(name, f"{mode}: {_error_text(exc1)}")
            grads.clear()
            nbytes = case.bytes.get(mode)
            for name, (p50, p20, p80) in stats.items():
                for t in leaves:  # grads of the last run would be freed inside the measured call
                    t.grad = None
                try:
                    peak = peak_memory(calls[name], self.device)
                except Exception as exc:  # out of memory, say: the time stands, the peak is unknown
                    peak = None
                    result.errors.setdefault(name, f"{mode} peak memory: {_error_text(exc)}")
                gbps = None if nbytes is None else nbytes / (p50 * 1e-3) / 1e9
                result.times[(name, mode)] = Measurement(p50, p20, p80, peak, gbps)
            for t in leaves:
                t.grad = None
        return result


# --- outputs ------------------------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}g}" if abs(v) < 10**digits else f"{v:.0f}"


def _is_maskkern(provider: str) -> bool:
    return provider.startswith("maskkern")


def _check_cell(result: CaseResult) -> str:
    if "case" in result.errors:
        return "error"
    cells = []
    for name in result.case.providers:
        if not _is_maskkern(name) or name in result.case.baselines:
            continue
        label = "" if name == "maskkern" else name.removeprefix("maskkern-") + " "
        if name in result.errors:
            cells.append(f"{label}error")
        elif name in result.check:
            ok, err = result.check[name]
            cells.append(f"{label}{'✓' if ok else '✗ ' + _fmt(err, 2)}")
        else:
            cells.append(f"{label}—")
    return ", ".join(cells)


def markdown_table(kernel: str, results: list[CaseResult], ctx: Context) -> str:
    """The per-op table: one row per case and mode."""
    providers: list[str] = []
    for r in results:
        providers += [p for p in r.case.providers if p not in providers]
    peers = [p for p in providers if p != "maskkern"]
    has_gbps = any(m.gbps is not None for r in results for m in r.times.values())
    head = ["case", "mode", "check", *(f"{p} ms" for p in providers), *(f"× {p}" for p in peers)]
    head += ["GB/s", "% copy"] if has_gbps else []
    head += ["peak MB (" + " / ".join(providers) + ")"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in results:
        for mode in r.case.modes:
            times = [_fmt(r.p50(p, mode)) for p in providers]
            for i, p in enumerate(providers):
                if p in r.check and not r.check[p][0]:
                    times[i] += " ✗"
                if p in r.errors and (p, mode) not in r.times:
                    times[i] = "error"
            row = [r.case.name, mode, _check_cell(r), *times]
            row += [_fmt(r.ratio(p, mode), 3) for p in peers]
            if has_gbps:
                m = r.times.get(("maskkern", mode))
                gbps = None if m is None else m.gbps
                row += [_fmt(gbps), _fmt(None if gbps is None else 100 * gbps / ctx.copy_gbps, 2)]
            mem = [r.times.get((p, mode)) for p in providers]
            row.append(" / ".join(_fmt(m and m.peak_bytes and m.peak_bytes / 2**20) for m in mem))
            lines.append("| " + " | ".join(row) + " |")
        notes += [f"- {r.case.name}: {p}: {e}" for p, e in r.errors.items()]
    run = f"{ctx.device_name}; {ctx.versions}; {ctx.timestamp}; {load_note(ctx.load_at_start)}."
    method = (
        "ms = median per call over interleaved runs (p20/p80 in the CSV); `× p` = time(p) / time(maskkern)"
        " (> 1: maskkern is faster); ✓ = output (and grads) match the reference, ✗ = max abs error, a ✗"
        " after a time = that provider is wrong; peak MB = allocated above the inputs during one call."
    )
    if has_gbps:
        method += f" GB/s = compulsory bytes / median (maskkern); % copy = of {ctx.copy_gbps:.1f} GB/s copy_."
    out = [f"## {kernel}", "", run, "", method, "", *lines]
    if notes:
        out += ["", "Errors:", *notes]
    return "\n".join(out) + "\n"


def csv_rows(kernel: str, results: list[CaseResult], ctx: Context) -> list[dict[str, Any]]:
    """One row per measurement (time, gbps, memory per provider and mode; error per provider)."""
    rows = []
    run = (ctx.device_name, ctx.versions, ctx.timestamp)

    def row(case: Case, provider: str, mode: str, metric: str, unit: str, q: tuple[float, float, float]):
        config = json.dumps(case.config, sort_keys=True)
        rows.append(
            dict(
                zip(
                    CSV_COLUMNS,
                    (kernel, provider, mode, metric, unit, case.x_name, case.x, *q, config, *run),
                    strict=True,
                )
            )
        )

    for r in results:
        check_mode = "fwd+bwd" if "fwd+bwd" in r.case.modes else r.case.modes[0]
        for p, (_, err) in r.check.items():
            row(r.case, p, check_mode, "error", "abs", (err, err, err))
        for (p, mode), m in r.times.items():
            row(r.case, p, mode, "time", "ms", (m.p50, m.p20, m.p80))
            if m.gbps is not None:
                g = r.case.bytes[mode] / 1e6
                row(r.case, p, mode, "gbps", "GB/s", (m.gbps, g / m.p80, g / m.p20))
            if m.peak_bytes is not None:
                mb = m.peak_bytes / 2**20
                row(r.case, p, mode, "memory", "MB", (mb, mb, mb))
    return rows


def plot(kernel: str, results: list[CaseResult], ctx: Context) -> list[Path]:
    """One PNG per ``Case.plot``: time (log) and, where bytes are known, GB/s against x, per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[CaseResult]] = {}
    for r in results:
        groups.setdefault(r.case.plot or r.case.x_name, []).append(r)
    paths = []
    for name, group in groups.items():
        if not any(r.times for r in group):  # every case failed: nothing to draw
            continue
        modes = [m for m in MODES if any(m in r.case.modes for r in group)]
        has_gbps = any(m.gbps is not None for r in group for m in r.times.values())
        rows = 2 if has_gbps else 1
        fig, axes = plt.subplots(rows, len(modes), figsize=(5.5 * len(modes), 4 * rows), squeeze=False)
        xs = [r.case.x for r in group]
        numeric = all(isinstance(x, (int, float)) for x in xs)
        for j, mode in enumerate(modes):
            for provider in dict.fromkeys(p for r in group for p in r.case.providers):
                pts = [
                    (r.case.x if numeric else i, r.times[(provider, mode)])
                    for i, r in enumerate(group)
                    if (provider, mode) in r.times
                ]
                if not pts:
                    continue
                x = [p[0] for p in pts]
                style = dict(marker="o", lw=2.5 if _is_maskkern(provider) else 1.5, label=provider)
                axes[0][j].plot(x, [m.p50 for _, m in pts], **style)
                axes[0][j].fill_between(x, [m.p20 for _, m in pts], [m.p80 for _, m in pts], alpha=0.2)
                if has_gbps:
                    axes[1][j].plot(x, [m.gbps or math.nan for _, m in pts], **style)
            axes[0][j].set(title=f"{kernel} {name} — {mode}", ylabel="ms (p50, p20–p80)", yscale="log")
            if has_gbps:
                axes[1][j].axhline(ctx.copy_gbps, color="gray", ls="--", label="copy_")
                axes[1][j].set(ylabel="GB/s")
            for ax in axes[:, j]:
                ax.set_xlabel(group[0].case.x_name)
                if not numeric:
                    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
                elif min(xs) > 0 and max(xs) / min(xs) >= 8:
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(sorted(set(xs)), [str(x) for x in sorted(set(xs))])
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle(ctx.device_name, fontsize=9)
        fig.tight_layout()
        path = ctx.out_dir / f"{kernel}_{_slug(name)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def summary_markdown(targets: list[Target], ctx: Context) -> str:
    """SUMMARY.md: each target with its measured value, requirement and pass/fail."""
    lines = [
        f"# maskkern benchmark summary — {ctx.device_name}",
        "",
        f"{ctx.timestamp}; {ctx.versions}; copy_ bandwidth {ctx.copy_gbps:.1f} GB/s"
        f"{'; --quick run' if ctx.quick else ''}; {load_note(ctx.load_at_start)}.",
        "",
        summary_rows(targets),
    ]
    return "\n".join(lines) + "\n"


def summary_rows(targets: list[Target]) -> str:
    """The targets as a markdown table: measured, required, pass/fail."""
    lines = ["| target | measured | required | result |", "|---|---|---|---|"]
    for t in targets:
        verdict = {True: "pass", False: "**FAIL**", None: "n/a"}[t.passed]
        measured, required = f"{_fmt(t.measured)}{t.unit}", f"{t.op} {_fmt(t.required)}{t.unit}"
        lines.append(f"| {t.name} | {measured} | {required} | {verdict} |")
    return "\n".join(lines)


# --- the command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="maskkern benchmarks (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute for the suite)")
    parser.add_argument("--only", default="", help="comma-separated kernels to run (default: all)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--backend", default=None, help="force maskkern's backend (e.g. torch)")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: bench/results/<device>)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser.parse_args(argv)


def main(modules: list[ModuleType], argv: list[str] | None = None, suite: bool = False) -> int:
    """Run the cases of ``modules``, print and write the outputs; 1 if a maskkern check failed or
    a maskkern provider raised. ``suite`` (bench/run.py): write SUMMARY.md unless ``--only``."""
    from tqdm import tqdm

    args = parse_args(argv)
    # A time box's signal (timeout sends TERM, or INT, which a shell leaves ignored in a background
    # job) stops the run the way Ctrl-C does: the finished cases are written.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    only = list(dict.fromkeys(k for k in args.only.split(",") if k))
    by_name = {m.KERNEL: m for m in modules}
    unknown = [k for k in only if k not in by_name]
    if unknown:
        raise SystemExit(f"--only: unknown kernel(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    modules = [by_name[k] for k in only] if only else modules  # in --only's order
    slug = device_slug(device)
    out_dir = args.out or (RESULTS / "tmp" / f"{slug}-quick" if args.quick else RESULTS / slug)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(device, args.quick, args.backend, out_dir, plots=not args.no_plots)
    print(f"maskkern bench on {ctx.device_name}: {ctx.versions}", file=sys.stderr)
    print(f"copy_ bandwidth: {ctx.copy_gbps:.1f} GB/s; results -> {out_dir}", file=sys.stderr)
    plan, failed = [], False
    for module in modules:
        try:
            plan.append((module, module.cases(ctx)))
        except Exception:
            print(f"[bench] {module.KERNEL}: cases() failed:\n{traceback.format_exc()}", file=sys.stderr)
            failed = True
    bar = tqdm(total=sum(len(c.modes) for _, cases in plan for c in cases), unit="step", dynamic_ncols=True)
    targets: list[Target] = []
    interrupted = False
    for module, cases in plan:
        results = {}
        try:
            for case in cases:

                def on_mode(mode: str, case: Case = case, kernel: str = module.KERNEL) -> None:
                    if mode != case.modes[0]:
                        bar.update(1)
                    bar.set_description(f"{kernel} {case.name} {mode}")

                results[case.name] = ctx.run_case(case, on_mode)
                bar.update(1)
                gc.collect()
                if ctx.on_gpu:
                    torch.cuda.empty_cache()
        except KeyboardInterrupt:  # a time box (SIGINT): keep what this kernel has measured
            interrupted = True
            print(f"\n[bench] interrupted in {module.KERNEL}: writing its finished cases", file=sys.stderr)
        kernel_targets, ok = _write_kernel(module, results, ctx)
        targets += kernel_targets
        failed |= not ok
        if interrupted:
            break
    bar.close()
    summary = summary_markdown(targets, ctx)
    print(summary)
    if suite and not only and not interrupted:
        (out_dir / "SUMMARY.md").write_text(summary)
    return 130 if interrupted else 1 if failed else 0


def _write_kernel(
    module: ModuleType, results: dict[str, CaseResult], ctx: Context
) -> tuple[list[Target], bool]:
    """Prints and writes one kernel's table, CSV and plots; returns its targets and whether its
    maskkern providers all ran and passed their checks."""
    from tqdm import tqdm

    ok = True
    try:
        kernel_targets = module.targets(ctx, results) if hasattr(module, "targets") else []
    except Exception:
        print(f"[bench] {module.KERNEL}: targets() failed:\n{traceback.format_exc()}", file=sys.stderr)
        kernel_targets, ok = [], False
    table = markdown_table(module.KERNEL, list(results.values()), ctx)
    if kernel_targets:
        table += "\n" + summary_rows(kernel_targets) + "\n"
    tqdm.write(table)
    (ctx.out_dir / f"{module.KERNEL}.md").write_text(table)
    with open(ctx.out_dir / f"{module.KERNEL}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(module.KERNEL, list(results.values()), ctx))
    if ctx.plots:
        plot(module.KERNEL, list(results.values()), ctx)
    ok &= not any(
        "case" in r.errors or (_is_maskkern(p) and (p in r.errors or not r.check.get(p, (True, 0))[0]))
        for r in results.values()
        for p in r.case.providers
    )
    return kernel_targets, ok
