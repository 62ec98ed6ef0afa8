"""Outputs, for bench/_harness.py: what a run says about itself and what it measured. The machine
(``device_name``, ``device_slug``, ``versions``, ``load_note``), then per kernel the markdown table
(one row per case and mode, the cases' shapes and settings under it), the CSV (one row per
measurement, CSV_COLUMNS), the PNG plots, and the targets (``summary_rows``, SUMMARY.md). The files go
to ``ctx.out_dir``; the columns are explained in bench/README.md."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from _timing import matmul_shape

import maskkern

if TYPE_CHECKING:
    from _harness import Case, CaseResult, Context, Target

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
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


def load_average() -> float | None:
    """The 1-minute load average, None where the OS has none."""
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


def matmul_note(ctx: Context) -> str:
    """The matmul rate the GFLOP/s columns are read against, with what was measured."""
    n, dtype = matmul_shape(ctx.device)
    return f"torch.mm {n}x{n} {str(dtype).removeprefix('torch.')}: {ctx.matmul_gflops:.0f} GFLOP/s"


# --- a kernel's table, CSV and plots ------------------------------------------------------------


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}g}" if abs(v) < 10**digits else f"{v:.0f}"


def is_maskkern(provider: str) -> bool:
    """Whether ``provider`` is one of maskkern's (its checks decide the exit status)."""
    return provider.startswith("maskkern")


def _check_cell(result: CaseResult) -> str:
    if "case" in result.errors:
        return "error"
    cells = []
    for name in result.case.providers:
        if not is_maskkern(name) or name in result.case.baselines:
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


def _work_unit(results: list[CaseResult]) -> str | None:
    """The unit of the kernel's work count (``Case.work_unit``), None when no case counts work."""
    return next((r.case.work_unit for r in results if r.case.work), None)


def _config_text(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def markdown_table(kernel: str, results: list[CaseResult], ctx: Context) -> str:
    """The per-op table: one row per case and mode, then each case's shapes and settings."""
    providers: list[str] = []
    for r in results:
        providers += [p for p in r.case.providers if p not in providers]
    peers = [p for p in providers if p != "maskkern"]
    has_gbps = any(m.gbps is not None for r in results for m in r.times.values())
    unit = _work_unit(results)
    flops = unit == "GFLOP"
    head = ["case", "mode", "check", *(f"{p} ms" for p in providers), *(f"× {p}" for p in peers)]
    head += ["GB/s", "% copy"] if has_gbps else []
    head += [f"{unit}/s (" + " / ".join(providers) + ")"] if unit else []
    head += ["% matmul"] if flops else []
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
            ours = r.times.get(("maskkern", mode))
            if has_gbps:
                gbps = None if ours is None else ours.gbps
                row += [_fmt(gbps), _fmt(None if gbps is None else 100 * gbps / ctx.copy_gbps, 2)]
            if unit:
                rates = [r.times.get((p, mode)) for p in providers]
                row.append(" / ".join(_fmt(m and m.rate) for m in rates))
            if flops:
                rate = None if ours is None else ours.rate
                row.append(_fmt(None if rate is None else 100 * rate / ctx.matmul_gflops, 2))
            mem = [r.times.get((p, mode)) for p in providers]
            row.append(" / ".join(_fmt(m and m.peak_bytes and m.peak_bytes / 2**20) for m in mem))
            lines.append("| " + " | ".join(row) + " |")
        notes += [f"- {r.case.name}: {p}: {e}" for p, e in r.errors.items()]
    run = f"{ctx.device_name}; {ctx.versions}; {ctx.timestamp}; {load_note(ctx.load_at_start)}."
    if flops:
        run += f" Matmul rate: {matmul_note(ctx)}."
    method = (
        "ms = median per call over interleaved runs (p20/p80 in the CSV); `× p` = time(p) / time(maskkern)"
        " (> 1: maskkern is faster); ✓ = output (and grads) match the reference, ✗ = max abs error, a ✗"
        " after a time = that provider is wrong; peak MB = allocated above the inputs during one call."
    )
    if has_gbps:
        method += f" GB/s = compulsory bytes / median (maskkern); % copy = of {ctx.copy_gbps:.1f} GB/s copy_."
    if unit:
        method += f" {unit}/s = the case's {unit} per call (the script's model) / median, per provider."
    if flops:
        method += " % matmul = maskkern's GFLOP/s as a share of the matmul rate above."
    shapes = [f"- {r.case.name}: {_config_text(r.case.config)}" for r in results]
    out = [f"## {kernel}", "", run, "", method, "", *lines, "", "Cases:", *shapes]
    if notes:
        out += ["", "Errors:", *notes]
    return "\n".join(out) + "\n"


def csv_rows(kernel: str, results: list[CaseResult], ctx: Context) -> list[dict[str, Any]]:
    """One row per measurement (time, gbps, rate, memory per provider and mode; error per provider)."""
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
            if m.rate is not None:
                w = r.case.work[mode] * 1e3
                row(r.case, p, mode, "rate", f"{r.case.work_unit}/s", (m.rate, w / m.p80, w / m.p20))
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
        modes = list(dict.fromkeys(m for r in group for m in r.case.modes))
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
                style = dict(marker="o", lw=2.5 if is_maskkern(provider) else 1.5, label=provider)
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


def write_kernel(kernel: str, results: list[CaseResult], targets: list[Target], ctx: Context) -> None:
    """Prints one kernel's table (with its targets) and writes ``<kernel>.md``, ``<kernel>.csv`` and,
    unless ``ctx.plots`` is off, its plots to ``ctx.out_dir``."""
    from tqdm import tqdm

    table = markdown_table(kernel, results, ctx)
    if targets:
        table += "\n" + summary_rows(targets) + "\n"
    tqdm.write(table)
    (ctx.out_dir / f"{kernel}.md").write_text(table)
    with open(ctx.out_dir / f"{kernel}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(kernel, results, ctx))
    if ctx.plots:
        plot(kernel, results, ctx)


# --- the targets --------------------------------------------------------------------------------

INDICATIVE_NOTE = (
    "indicative: measured at another case (shape) than the one the target was set for, as a --quick"
    " run's smaller shapes are; shown, not judged."
)


def summary_rows(targets: list[Target]) -> str:
    """The targets as a markdown table: measured, required, and pass / FAIL / n/a (not measured) or
    indicative (measured at another case than the target's), with a note when any is indicative."""
    lines = ["| target | measured | required | result |", "|---|---|---|---|"]
    for t in targets:
        verdict = {True: "pass", False: "**FAIL**", None: "n/a"}[t.passed]
        if t.indicative:
            verdict = f"indicative (set at {t.set_at})"
        measured, required = f"{_fmt(t.measured)}{t.unit}", f"{t.op} {_fmt(t.required)}{t.unit}"
        lines.append(f"| {t.name} | {measured} | {required} | {verdict} |")
    if any(t.indicative for t in targets):
        lines += ["", INDICATIVE_NOTE]
    return "\n".join(lines)


def summary_markdown(targets: list[Target], ctx: Context) -> str:
    """SUMMARY.md: each target with its measured value, requirement and verdict."""
    lines = [
        f"# maskkern benchmark summary — {ctx.device_name}",
        "",
        f"{ctx.timestamp}; {ctx.versions}; {ctx.rates_note()}"
        f"{'; --quick run' if ctx.quick else ''}; {load_note(ctx.load_at_start)}.",
        "",
        summary_rows(targets),
    ]
    return "\n".join(lines) + "\n"
