"""The benchmark harness shared by every ``bench/bench_<op>.py``: what a script declares (``Case``,
``Target``), how a case runs (``Context.run_case``: correctness, then time and memory per provider
and mode) and the command line (``main``). Timing and memory live in ``bench/_timing.py``, the
outputs (machine description, tables, CSV, plots, SUMMARY.md) in ``bench/_report.py``.

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
(``sdpa``, ``liger``, ``apex``) passed when importable. A CPU ``--quick`` run leaves out
``maskkern-nocache`` and ``compile`` (compiling takes longer than the quick run has).

A ``Target`` is a headline requirement, set for one case (``set_at``, its shape): judged (pass /
FAIL) only when measured at that case, "indicative" otherwise (a ``--quick`` run at smaller shapes).

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
   once per run by a large ``copy_`` (bytes read + written). Likewise ``Case.work[mode]`` / p50 (useful
   GFLOP, tokens, ... per second, every provider), GFLOP/s read against the machine's matmul rate
   (a square ``torch.mm``, measured at the start of a run that counts GFLOP).

Outputs in ``--out`` (default ``bench/results/<device-slug>/``; ``--quick`` runs go to the git-ignored
``bench/results/tmp/``): ``<kernel>.md`` (the table, also printed, with each case's shapes and
settings), ``<kernel>.csv`` (one row per measurement: CSV_COLUMNS; metrics ``time`` ms, ``gbps``
GB/s, ``rate`` work/s, ``memory`` MB, ``error`` max abs error), ``<kernel>_<plot>.png`` (time and GB/s
against the swept ``x``, one line per provider, a panel per mode) and, from the runner,
``SUMMARY.md`` (the targets: measured, required, pass / FAIL / indicative).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from _report import (
    RESULTS,
    device_name,
    device_slug,
    is_maskkern,
    load_average,
    matmul_note,
    summary_markdown,
    versions,
    write_kernel,
)
from _timing import FULL, QUICK, Budget, GradSlots, copy_bandwidth, matmul_rate, peak_memory, time_interleaved
from torch import Tensor

import maskkern
from maskkern.testing import TOL  # (rtol, atol) of a provider against the reference, as in the tests

MODES = ("fwd", "fwd+bwd", "step")

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
        work, work_unit: mode -> the useful work of one call in ``work_unit`` (e.g. 1.2 "GFLOP" by
            the script's FLOP model, 3000 "tokens"): the table's ``<unit>/s`` column, per provider.
            "GFLOP" is also read against the machine's matmul rate (% matmul).
        budget: how long to measure this case, in place of the run's (for calls of seconds).
        peak: False when the providers allocate in other processes (the script then fills
            ``Measurement.peak_bytes`` itself); the harness measures the peak in this one otherwise.
        grad_layout: provider -> a function that maps the fixed output gradient (in the reference's
            layout) to that provider's output layout, once, untimed: for baselines that compute the
            same result in another layout (padded against packed sequences), so that neither side
            times a layout conversion.
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
    work: dict[str, float] = field(default_factory=dict)
    work_unit: str = ""
    budget: Budget | None = None
    peak: bool = True
    grad_layout: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)


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
    """Per-call time quantiles in ms, peak memory in bytes (None if not measured), GB/s, and the
    rate of useful work (``Case.work`` / p50, in ``Case.work_unit`` per second)."""

    p50: float
    p20: float
    p80: float
    peak_bytes: int | None = None
    gbps: float | None = None
    rate: float | None = None


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
    """A headline row of SUMMARY.md: ``measured <op> required`` passes (op is ">=" or "<="), judged
    only at the case it was set for.

    ``set_at`` names the case (its shape and settings, usually the case's name) the requirement was
    set for; ``measured_at`` the one the value was measured at (default: the same). When they differ,
    as a --quick run's smaller shapes do, the target is indicative: shown, neither pass nor FAIL.
    The exit status never depends on targets (only on maskkern's checks)."""

    name: str
    measured: float | None
    required: float
    op: str = ">="
    unit: str = "×"
    set_at: str = field(kw_only=True)
    measured_at: str | None = field(default=None, kw_only=True)

    @property
    def indicative(self) -> bool:
        """Measured at another case than the one the requirement was set for."""
        return self.measured_at is not None and self.measured_at != self.set_at

    @property
    def passed(self) -> bool | None:
        """True / False when judged; None when not measured (or NaN) or indicative."""
        if self.indicative or self.measured is None or math.isnan(self.measured):
            return None
        return self.measured >= self.required if self.op == ">=" else self.measured <= self.required


def compiled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``torch.compile`` of the eager function, static shapes (its best case; compiled on first use,
    which the warm-up absorbs)."""
    return torch.compile(fn, dynamic=False)


# --- running a case -----------------------------------------------------------------------------


def _provider_grad(case: Case, provider: str, grad: Tensor | None) -> Tensor | None:
    """The fixed output gradient in ``provider``'s output layout (Case.grad_layout)."""
    layout = case.grad_layout.get(provider)
    return grad if grad is None or layout is None else layout(grad).detach()


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
        self._matmul_gflops: float | None = None
        self.load_at_start = load_average()

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

    @property
    def matmul_gflops(self) -> float:
        """The machine's measured dense matmul rate (GFLOP/s, _timing.matmul_rate), measured once per
        run on first use (main measures it at the start when a case counts GFLOP)."""
        if self._matmul_gflops is None:
            self._matmul_gflops = matmul_rate(self.device, self.budget)
        return self._matmul_gflops

    def rates_note(self) -> str:
        """The reference rates measured in this run: the copy bandwidth, and the matmul rate if used."""
        note = f"copy_ bandwidth {self.copy_gbps:.1f} GB/s"
        return note if self._matmul_gflops is None else f"{note}; matmul rate {matmul_note(self)}"

    @property
    def compiles(self) -> bool:
        """Whether the ``compile`` peer runs: not in a CPU --quick run, where compiling it (tens of
        seconds per graph and mode with a cold inductor cache on a 2-core CPU) would take more than
        the minute the whole quick run has; the full run has it."""
        return not (self.quick and not self.on_gpu)

    def maskkern_backends(self, nocache: bool = True) -> list[tuple[str, str]]:
        """(provider name, backend): the device's default as ``maskkern``, then on GPU
        ``maskkern-<backend>`` for every other available backend, on CPU ``maskkern-nocache`` unless
        ``nocache`` is False (for ops whose large buffers are not maskkern's outputs) or the run is a
        --quick one (the column is a diagnostic; no target reads it); ``--backend`` forces one."""
        if self.backend is not None:
            return [("maskkern", self.backend)]
        status = maskkern.backends()
        order = ("triton", "cuda") if self.on_gpu else ("cpu",)
        found = [b for b in order if status[b].available] or ["torch"]
        extra = [(NO_CACHE, "cpu")] if nocache and not self.quick and found[0] == "cpu" else []
        return [("maskkern", found[0])] + [(f"maskkern-{b}", b) for b in found[1:]] + extra

    def providers(
        self,
        maskkern: Callable[[str], Callable[..., Tensor]],
        eager: Callable[..., Tensor],
        nocache: bool = True,
        **peers: Callable[..., Tensor] | None,
    ) -> dict[str, Callable[..., Tensor]]:
        """The standard providers: ``maskkern(backend)`` for each of maskkern_backends(nocache), ``eager``,
        ``compile`` = compiled(eager) where ``self.compiles``, then the peers that are not None (pass
        None when a peer is not importable or does not apply here)."""
        out = {name: maskkern(backend) for name, backend in self.maskkern_backends(nocache)}
        out["eager"] = eager
        if self.compiles:
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
        budget = case.budget or self.budget
        for mode in case.modes:
            on_mode(mode)
            for t in leaves:
                t.requires_grad_(mode == "fwd+bwd")
            calls = {
                name: _mode_fn(fn, inputs, mode, leaves, _provider_grad(case, name, grad))
                for name, fn in providers.items()
            }
            if NO_CACHE in calls:
                calls[NO_CACHE] = _cache_off(calls[NO_CACHE])
            grads = GradSlots(leaves if mode == "fwd+bwd" else [])
            try:
                stats = time_interleaved(calls, self.device, budget, grads.switch)
            except Exception:  # one provider failing in this mode: time the others alone
                stats = {}
                for name, call in calls.items():
                    grads.clear()
                    try:
                        stats.update(time_interleaved({name: call}, self.device, budget, grads.switch))
                    except Exception as exc1:
                        result.errors.setdefault(name, f"{mode}: {_error_text(exc1)}")
            grads.clear()
            nbytes, work = case.bytes.get(mode), case.work.get(mode)
            for name, (p50, p20, p80) in stats.items():
                for t in leaves:  # grads of the last run would be freed inside the measured call
                    t.grad = None
                peak = None
                try:
                    if case.peak:
                        peak = peak_memory(calls[name], self.device)
                except Exception as exc:  # out of memory, say: the time stands, the peak is unknown
                    result.errors.setdefault(name, f"{mode} peak memory: {_error_text(exc)}")
                gbps = None if nbytes is None else nbytes / (p50 * 1e-3) / 1e9
                rate = None if work is None else work / (p50 * 1e-3)
                result.times[(name, mode)] = Measurement(p50, p20, p80, peak, gbps, rate)
            for t in leaves:
                t.grad = None
        return result


# --- the command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="maskkern benchmarks (see bench/README.md)")
    parser.add_argument(
        "--quick", action="store_true", help="a short run: the targets' cases, no plots (about a minute)"
    )
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
    # A quick run draws no plots: a few seconds of its minute, for one or two points per curve.
    ctx = Context(device, args.quick, args.backend, out_dir, plots=not (args.no_plots or args.quick))
    print(f"maskkern bench on {ctx.device_name}: {ctx.versions}", file=sys.stderr)
    plan, failed = [], False
    for module in modules:
        try:
            plan.append((module, module.cases(ctx)))
        except Exception:
            print(f"[bench] {module.KERNEL}: cases() failed:\n{traceback.format_exc()}", file=sys.stderr)
            failed = True
    if any(c.work_unit == "GFLOP" for _, cases in plan for c in cases):  # measured before any case
        print(f"matmul rate: {matmul_note(ctx)}", file=sys.stderr)
    print(f"copy_ bandwidth: {ctx.copy_gbps:.1f} GB/s; results -> {out_dir}", file=sys.stderr)
    for module, cases in plan:
        print(f"[bench] {module.KERNEL}: {'; '.join(c.name for c in cases)}", file=sys.stderr)
    # The imports' objects (torch, transformers: ~400k) are never garbage: out of the collections
    # that each case and each peak measurement start with, which took 0.2 s each otherwise.
    gc.freeze()
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
    ok = True
    try:
        kernel_targets = module.targets(ctx, results) if hasattr(module, "targets") else []
    except Exception:
        print(f"[bench] {module.KERNEL}: targets() failed:\n{traceback.format_exc()}", file=sys.stderr)
        kernel_targets, ok = [], False
    write_kernel(module.KERNEL, list(results.values()), kernel_targets, ctx)
    ok &= not any(
        "case" in r.errors or (is_maskkern(p) and (p in r.errors or not r.check.get(p, (True, 0))[0]))
        for r in results.values()
        for p in r.case.providers
    )
    return kernel_targets, ok
