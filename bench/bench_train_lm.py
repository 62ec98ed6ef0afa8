"""End to end: a byte-level Transformer LM trained on ragged, padded lines of the Python standard
library, twice from the same seed — eager PyTorch and maskkern (bench/lm_model.py: PadEmbedding,
mk.attention with lengths + causal, LinearCrossEntropyLoss). The two loss curves must agree; the
throughput (real, non-PAD tokens per second) and peak memory are compared.

Run alone, it trains both models in lockstep (the same batches, the same AdamW, the order of the two
steps alternating), prints the curves side by side with their max abs difference, tokens/s, ms/step
and peak memory, and writes ``train_lm_curves.{png,csv,md}`` to bench/results/<device>/ (``--quick``:
bench/results/tmp/). Exit status 1 if the curves disagree::

    python bench/bench_train_lm.py [--quick] [--steps N] [--layers N] [--dim N] [--heads N]
                                   [--batch N] [--max-len N] [--device cpu|cuda] [--backend B]

Under bench/run.py (the suite) it is one harness case — one fwd+bwd of each model on a fixed batch,
checked (loss) against eager, timed and measured in ``step`` mode — and its target runs the lockstep
training and requires the curves to agree.

Tokens/s counts timed steps only (the first few, warm-up, are excluded); peak memory is that of one
training step (forward, backward, AdamW) on the first batch, allocated above what is live before it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from _harness import Case, CaseResult, Context, Target
from _report import CSV_COLUMNS, RESULTS, device_name, device_slug, load_note, versions
from _timing import peak_memory
from lm_model import LMConfig, TinyLM, batches, grad_step, maskkern_twin, stdlib_lines
from torch import Tensor

KERNEL = "train_lm"
MODELS = ("eager", "maskkern")
LR = 2e-3
SEED = 0
# Max |Δloss| between the curves. Both train in fp32; the maskkern kernels round differently from
# eager's (scale applied to q, fused softmax and cross-entropy), ~1 ulp: measured < 1e-6 over the
# 150 default CPU steps. The margin is for longer runs and other devices' summation orders; a real
# semantic difference (a pad leaking into attention or the loss) moves the loss by > 1e-2.
AGREE_TOL = 1e-3


@dataclasses.dataclass
class Run:
    """What training one model produced: the loss per step, time and tokens of the timed steps."""

    losses: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    peak_bytes: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    cfg: LMConfig, steps: int, batch: int, device: torch.device, backend: str | None = None, seed: int = SEED
) -> dict[str, Run]:
    """Train the eager and the maskkern model in lockstep for ``steps`` steps on the same batches."""
    torch.manual_seed(seed)
    eager = TinyLM(cfg).to(device)
    models = {"eager": eager, "maskkern": maskkern_twin(eager, backend)}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=LR) for name, m in models.items()}
    stream = batches(stdlib_lines(cfg.max_len), batch, seed, device)
    data = [next(stream) for _ in range(steps)]
    runs = {name: Run() for name in MODELS}
    warmup = min(3, steps // 4)

    def step(name: str, ids: Tensor, targets: Tensor, lengths: Tensor) -> Tensor:
        loss = grad_step(models[name], ids, targets, lengths)
        opts[name].step()
        return loss

    for i, (ids, targets, lengths) in enumerate(data):
        for name in MODELS if i % 2 == 0 else MODELS[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            loss = float(step(name, ids, targets, lengths))  # float() waits for the step to finish
            runs[name].losses.append(loss)
            if i >= warmup:
                runs[name].seconds += time.perf_counter() - t0
                runs[name].tokens += int(lengths.sum())
    for name in MODELS:
        runs[name].peak_bytes = peak_memory(lambda name=name: step(name, *data[0]), device)
    return runs


def max_diff(runs: dict[str, Run]) -> float:
    """Max |Δloss| between the eager and the maskkern curve over all steps."""
    return max((abs(a - b) for a, b in zip(*(runs[m].losses for m in MODELS), strict=True)), default=0.0)


# --- outputs ------------------------------------------------------------------------------------


def report(runs: dict[str, Run], title: str) -> str:
    """Markdown: the two curves side by side (about 20 rows), then throughput and memory."""
    eager, fused = (runs[m].losses for m in MODELS)
    every = max(1, len(eager) // 20)
    rows = sorted({*range(0, len(eager), every), len(eager) - 1})
    lines = [
        f"## {KERNEL}: {title}",
        "",
        "| step | eager loss | maskkern loss | abs diff |",
        "|---|---|---|---|",
    ]
    lines += [f"| {i + 1} | {eager[i]:.5f} | {fused[i]:.5f} | {abs(eager[i] - fused[i]):.2e} |" for i in rows]
    diff = max_diff(runs)
    verdict = "agree" if diff <= AGREE_TOL else "**DISAGREE**"
    lines += ["", f"max |Δloss| over {len(eager)} steps: {diff:.2e} ({verdict}, tolerance {AGREE_TOL:g})", ""]
    lines += ["| | eager | maskkern | maskkern / eager |", "|---|---|---|---|"]
    e, f = (runs[m] for m in MODELS)
    mb = [None if r.peak_bytes is None else r.peak_bytes / 2**20 for r in (e, f)]
    lines += [
        f"| tokens/s (non-PAD) | {e.tokens_per_s:.0f} | {f.tokens_per_s:.0f} | "
        f"{f.tokens_per_s / e.tokens_per_s:.3f} |",
        f"| peak memory MB (one step) | {mb[0]:.1f} | {mb[1]:.1f} | {mb[1] / mb[0]:.3f} |",
        f"| final loss | {e.losses[-1]:.5f} | {f.losses[-1]:.5f} | |",
    ]
    return "\n".join(lines) + "\n"


def plot_curves(runs: dict[str, Run], path: Path, title: str) -> None:
    """The two loss curves (top) and their abs difference (bottom, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    steps = range(1, len(runs["eager"].losses) + 1)
    top.plot(steps, runs["eager"].losses, lw=3, alpha=0.5, label="eager PyTorch")
    top.plot(steps, runs["maskkern"].losses, lw=1, ls="--", label="maskkern")
    top.set(ylabel="train loss (nats/byte)", title=title)
    top.legend()
    diffs = [abs(a - b) or float("nan") for a, b in zip(*(runs[m].losses for m in MODELS), strict=True)]
    bottom.semilogy(steps, diffs, ".-", color="gray", label="|Δloss| (exact 0: no point)")
    bottom.axhline(AGREE_TOL, color="red", ls=":", label="tolerance")
    bottom.set(xlabel="step", ylabel="|Δloss|")
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(runs: dict[str, Run], path: Path, config: dict, device: torch.device) -> None:
    """The harness CSV schema: per model, the loss at every step, tokens/s and peak memory."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    common = dict(kernel=KERNEL, mode="step", config=json.dumps(config, sort_keys=True))
    common |= dict(device=device_name(device), versions=versions(), timestamp=stamp)

    def row(provider: str, metric: str, unit: str, x_name: str, x: int, v: float) -> dict:
        return common | dict(
            provider=provider, metric=metric, unit=unit, x_name=x_name, x=x, p50=v, p20=v, p80=v
        )

    rows = []
    for name, r in runs.items():
        rows += [row(name, "loss", "nats/byte", "step", i + 1, v) for i, v in enumerate(r.losses)]
        rows.append(row(name, "tokens_per_s", "tok/s", "steps", len(r.losses), r.tokens_per_s))
        if r.peak_bytes is not None:
            rows.append(row(name, "memory", "MB", "steps", len(r.losses), r.peak_bytes / 2**20))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def run_and_write(
    cfg: LMConfig, steps: int, batch: int, device: torch.device, backend: str | None, out_dir: Path
) -> tuple[dict[str, Run], str]:
    """Train both models, write train_lm_curves.{md,png,csv} to out_dir; the runs and the report."""
    load = os.getloadavg()[0]
    runs = train(cfg, steps, batch, device, backend)
    config = dataclasses.asdict(cfg) | {"batch": batch, "steps": steps, "lr": LR, "backend": backend}
    title = f"{device_name(device)}; " + ", ".join(f"{k}={v}" for k, v in config.items())
    text = report(runs, title) + f"\n{versions()}; {load_note(load)}.\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_lm_curves.md").write_text(text)
    plot_curves(runs, out_dir / "train_lm_curves.png", f"byte-level LM on stdlib lines ({device.type})")
    write_csv(runs, out_dir / "train_lm_curves.csv", config, device)
    return runs, text


# --- the suite's harness case -------------------------------------------------------------------

# (config, batch, steps): CPU-friendly by default (about a minute on 2 cores); bigger on a GPU.
CPU_RUN = (LMConfig(dim=128, layers=2, heads=4, max_len=128), 16, 150)
QUICK_RUN = (LMConfig(dim=64, layers=2, heads=4, max_len=96), 8, 30)
GPU_RUN = (LMConfig(dim=512, layers=4, heads=8, max_len=256), 64, 300)


def _suite_run(ctx: Context) -> tuple[LMConfig, int, int]:
    return QUICK_RUN if ctx.quick else GPU_RUN if ctx.on_gpu else CPU_RUN


def name(run: tuple[LMConfig, int, int]) -> str:
    """The harness case's name: the model and the batch."""
    cfg, batch, _ = run
    return f"d={cfg.dim} layers={cfg.layers} heads={cfg.heads} max_len={cfg.max_len} B={batch}"


def cases(ctx: Context) -> list[Case]:
    """One fwd+bwd of every model on the first batch, loss checked against eager."""
    cfg, batch, _ = _suite_run(ctx)
    backends = dict(ctx.maskkern_backends())

    def inputs() -> dict:
        ids, targets, lengths = next(batches(stdlib_lines(cfg.max_len), batch, SEED, ctx.device))
        torch.manual_seed(SEED)
        return dict(ids=ids, targets=targets, lengths=lengths, models={"eager": TinyLM(cfg).to(ctx.device)})

    def provider(name: str):
        def step(ids: Tensor, targets: Tensor, lengths: Tensor, models: dict[str, TinyLM]) -> Tensor:
            # Built on first use, so that a maskkern model that fails is one provider's error.
            if name not in models:
                models[name] = maskkern_twin(models["eager"], backends[name])
            return grad_step(models[name], ids, targets, lengths)

        return step

    return [
        Case(
            name=name(_suite_run(ctx)),
            x_name="batch",
            x=batch,
            config=dataclasses.asdict(cfg) | {"batch": batch, "dtype": "float32"},
            inputs=inputs,
            providers={name: provider(name) for name in (*backends, "eager")},
            reference=provider("eager"),
            modes=("step",),
        )
    ]


def targets(ctx: Context, results: dict[str, CaseResult]) -> list[Target]:
    """Trains both models in lockstep (the suite's size) and requires their loss curves to agree; set
    at the device's full run (indicative at a quick run's smaller model and fewer steps)."""
    run = _suite_run(ctx)
    cfg, batch, steps = run
    runs, text = run_and_write(cfg, steps, batch, ctx.device, ctx.backend, ctx.out_dir)
    print(text, file=sys.stderr)
    full = GPU_RUN if ctx.on_gpu else CPU_RUN
    at = {"set_at": f"{name(full)}, {full[2]} steps", "measured_at": f"{name(run)}, {steps} steps"}
    label = f"{KERNEL} {name(run)}: max abs Δloss over {steps} steps"
    return [Target(label, max_diff(runs), AGREE_TOL, "<=", "", **at)]


# --- the command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cfg, batch, steps = CPU_RUN
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"a short run: {QUICK_RUN}")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {steps})")
    p.add_argument("--layers", type=int, default=None, help=f"Transformer blocks (default {cfg.layers})")
    p.add_argument("--dim", type=int, default=None, help=f"model width (default {cfg.dim})")
    p.add_argument("--heads", type=int, default=None, help=f"attention heads (default {cfg.heads})")
    p.add_argument("--batch", type=int, default=None, help=f"lines per batch (default {batch})")
    p.add_argument("--max-len", type=int, default=None, help=f"bytes per line, cut (default {cfg.max_len})")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backend", default=None, help="maskkern backend (default: the device's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="output dir (default bench/results/<device>)")
    return p.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    """Train both models as the flags say, print the report; 1 if the curves disagree."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, batch, steps = QUICK_RUN if args.quick else CPU_RUN
    sizes = {k: getattr(args, k) for k in ("dim", "layers", "heads", "max_len") if getattr(args, k)}
    cfg = dataclasses.replace(cfg, **sizes)
    device = torch.device(args.device)
    slug = device_slug(device)
    out_dir = args.out or (RESULTS / "tmp" / f"{slug}-quick" if args.quick else RESULTS / slug)
    runs, text = run_and_write(cfg, args.steps or steps, args.batch or batch, device, args.backend, out_dir)
    print(text)
    print(f"wrote {out_dir}/train_lm_curves.{{md,png,csv}}")
    return 0 if max_diff(runs) <= AGREE_TOL else 1


if __name__ == "__main__":
    raise SystemExit(cli())
