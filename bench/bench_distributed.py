"""vocab_parallel_linear_cross_entropy on 2 gloo ranks vs gathering the full logits and vs torch's
loss_parallel on the same shards: time and peak memory per rank of one training step of the head's
loss (forward + backward, gradients of hidden and of the weight slice).

How it is measured (the harness times a process; this op runs in two): each case starts a world of
2 spawned ranks on loopback (gloo, ``threads // 2`` threads each), every rank building its shard of
the same seeded inputs. A provider here is a proxy: one call sends "step" to both ranks, which run
one fwd+bwd of that provider together, and returns when both are done, so the harness's time is the
2-rank step's wall time (plus a pipe round trip, ~0.1 ms). The peak memory is measured inside the
ranks with the harness's own ``peak_memory`` (one more step per provider) and replaces, in
``targets()``, the proxy's peak (the parent allocates nothing): the table's memory column is the
larger of the two ranks' peaks. The loss each proxy returns (rank 0's) is checked against
``mk.linear_cross_entropy`` on the gathered head in the parent.

Providers, each a step on rank r holding head rows [o_r, o_r + V/2):
- ``maskkern``: ``vocab_parallel_linear_cross_entropy(hidden, weight_r, target)``: chunks of
  tokens, no logits held; statistics all-gathered per chunk, grad_hidden all-reduced per chunk.
- ``eager``: the gathered-logits expression: ``logits_r = hidden @ weight_r.T``, all-gather to the
  (N, V) logits, ``F.cross_entropy``, backward (the slice of the logits' gradient, then an
  all-reduce of grad_hidden, Megatron's copy-to-region).
- ``loss_parallel``: ``logits_r`` as a Shard(1) DTensor, ``F.cross_entropy`` inside
  ``loss_parallel()`` (torch's vocab-parallel loss; grad_hidden all-reduced the same way).

Sizes. The issue sets its targets (per-rank peak <= 0.1x the gathered-logits expression's, time <=
1.0x, 2 gloo ranks) at N = 8192, H = 1024, V = 128000, where two ranks of the eager expression do
not fit on this machine: measured at N = 2048, it peaks per rank at 9.5 bytes per (token,
vocabulary entry), the gathered logits and their gradient, above the weight slice's 0.26 GB
gradient; at N = 8192 that is 10.2 GB per rank, 20.4 GB for two of the 23 GB, before the inputs
and the ranks' own memory. The targets are therefore graded at GRADED, N = 4096 with the issue's
head (H = 1024, V = 128000): the most tokens (a power of two) at which both ranks of each peer fit
with room, 5.2 GB per rank of eager's. Fewer tokens make the contrast smaller, not larger:
the weight slice's gradient, which both sides hold, is a larger share of eager's peak. Each step
there is three (N, H) × (H, V/2) matmuls per rank, seconds at one thread per rank, so the case is
timed in three rounds (``_timing.SLOW``). A --quick run measures N = 2048, H = 64, V = 8000 (a
tenth of a second a step): its targets are indicative.

The issue's shape itself runs apart, once: ``python bench/bench_distributed.py --headline`` (one
step per provider after a warm-up; a peer skipped, with its on-paper peak, when 2 ranks of it would
not fit in memory) writes its own table, bench/results/<device>/distributed_headline.{md,csv}.

Bytes model: none (the step is matmul-bound; the point is the memory per rank).

    python bench/bench_distributed.py [--quick] | [--headline]
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import datetime
import json
import os
import socket
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from _harness import Case, CaseResult, Context, Target, main
from _timing import SLOW
from torch import Tensor

import maskkern as mk
from maskkern.distributed import _all_gather  # torch's name for it changed in 2.13
from maskkern.testing import LINEAR_CROSS_ENTROPY_TOL

KERNEL = "distributed"
WORLD = 2
IGNORED = 0.25
PROVIDERS = ("maskkern", "eager", "loss_parallel")
HEADLINE = dict(N=8192, H=1024, V=128000)  # the shape: --headline
GRADED = dict(N=4096, H=1024, V=128000)  # where the targets are judged (module docstring)
QUICK = dict(N=2048, H=64, V=8000)


def _sizes(ctx: Context) -> list[dict]:
    return [QUICK] if ctx.quick else [GRADED]


def name(cfg: dict) -> str:
    return f"N={cfg['N']} H={cfg['H']} V={cfg['V']} float32 {WORLD} ranks"


# --- inside a rank -------------------------------------------------------------------------------


def _inputs(cfg: dict, dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """The full (hidden, weight, target), the same in every process (seeded)."""
    g = torch.Generator().manual_seed(0)
    n, h, v = cfg["N"], cfg["H"], cfg["V"]
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.randperm(n, generator=g)[: int(n * IGNORED)]] = -100
    return hidden, weight, target


class _CopyToGroup(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient backward (Megatron's copy to the TP region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherVocab(torch.autograd.Function):
    """(N, V_r) slices -> the (N, V) logits on every rank (equal slices); backward: this rank's
    slice of the gradient (every rank computes the same loss from the same logits)."""

    @staticmethod
    def forward(ctx, local, group):
        world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        out = local.new_empty((world * local.shape[0], local.shape[1]))
        _all_gather(out, local.contiguous(), group=group)
        ctx.rank, ctx.width = rank, local.shape[1]
        return out.view(world, *local.shape).permute(1, 0, 2).reshape(local.shape[0], -1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width], None


def _rank_providers(hidden: Tensor, weight: Tensor, target: Tensor, group):
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from maskkern.distributed import vocab_parallel_linear_cross_entropy

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))

    def ours() -> Tensor:
        return vocab_parallel_linear_cross_entropy(hidden, weight, target, group=group)

    def eager() -> Tensor:
        logits = _CopyToGroup.apply(hidden, group) @ weight.T
        return F.cross_entropy(_GatherVocab.apply(logits, group), target)

    def parallel() -> Tensor:
        logits = _CopyToGroup.apply(hidden, group) @ weight.T
        with loss_parallel():
            loss = F.cross_entropy(DTensor.from_local(logits, mesh, [Shard(1)], run_check=False), target)
            loss.backward()
        return loss.to_local().detach()

    def step(fn, backward: bool = True):
        def run() -> float:
            hidden.grad = weight.grad = None
            loss = fn()
            if backward:
                loss.backward()
            return float(loss.detach())

        return run

    return {"maskkern": step(ours), "eager": step(eager), "loss_parallel": step(parallel, backward=False)}


def _rank_main(rank: int, port: int, conn, cfg: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
            timeout=datetime.timedelta(seconds=900),
        )  # fmt: skip
        from _timing import peak_memory

        hidden, weight, target = _inputs(cfg)
        v_r = cfg["V"] // WORLD
        hidden.requires_grad_()
        weight = weight[rank * v_r : (rank + 1) * v_r].clone().requires_grad_()
        steps = _rank_providers(hidden, weight, target, None)
        conn.send(("ready", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                break
            try:
                if cmd == "step":
                    conn.send(("ok", steps[arg]()))
                elif cmd == "peak":
                    conn.send(("ok", peak_memory(steps[arg], torch.device("cpu"))))
            except Exception:
                conn.send(("error", traceback.format_exc()))
        torch.distributed.destroy_process_group()
    except Exception:
        conn.send(("error", traceback.format_exc()))


# --- the parent: a pool of ranks per case --------------------------------------------------------


class Pool:
    """WORLD spawned ranks holding one case's shards, driven in lockstep by commands."""

    def __init__(self, cfg: dict, threads: int) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        self.conns, self.procs = [], []
        for rank in range(WORLD):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_rank_main, args=(rank, port, child, cfg, threads), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        self._replies()

    def _replies(self) -> list:
        out = []
        for c in self.conns:
            status, value = c.recv()
            if status == "error":
                self.close()
                raise RuntimeError(f"a rank failed:\n{value}")
            out.append(value)
        return out

    def send(self, cmd: str, arg: str | None = None) -> list:
        for c in self.conns:
            c.send((cmd, arg))
        return self._replies()

    def close(self) -> None:
        for c, p in zip(self.conns, self.procs, strict=True):
            if p.is_alive():
                with contextlib.suppress(OSError):
                    c.send(("stop", None))
                p.join(10)
            if p.is_alive():
                p.kill()
        self.conns, self.procs = [], []


_POOLS: dict[str, Pool] = {}
_PEAKS: dict[str, dict[str, int]] = {}  # case name -> provider -> max over ranks of the peak bytes


def _collect_peaks() -> None:
    """Measures, in the ranks, each provider's peak of the pools still open, then closes them."""
    for case_name, pool in list(_POOLS.items()):
        try:
            _PEAKS[case_name] = {p: max(pool.send("peak", p)) for p in PROVIDERS}
        except Exception:
            traceback.print_exc()
        pool.close()
        del _POOLS[case_name]


atexit.register(lambda: [p.close() for p in _POOLS.values()])


def _threads() -> int:
    return max(1, torch.get_num_threads() // WORLD)


def case(ctx: Context, cfg: dict) -> Case:
    case_name = name(cfg)

    def inputs() -> dict:
        _collect_peaks()  # the previous case's world is done: measure it in the ranks, then close
        _POOLS[case_name] = Pool(cfg, _threads())
        hidden, weight, target = _inputs(cfg)
        return {"hidden": hidden, "weight": weight, "target": target}

    def proxy(provider: str):
        def fn(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
            return torch.tensor(_POOLS[case_name].send("step", provider)[0])

        return fn

    return Case(
        name=case_name,
        x_name="N",
        x=cfg["N"],
        config=dict(cfg, dtype="float32", ranks=WORLD, ignored=IGNORED, threads_per_rank=_threads()),
        inputs=inputs,
        providers={p: proxy(p) for p in PROVIDERS},
        reference=lambda hidden, weight, target: mk.linear_cross_entropy(hidden, weight, target),
        modes=("step",),
        tol=LINEAR_CROSS_ENTROPY_TOL[torch.float32],
        budget=SLOW,  # each call is a step of two processes; at GRADED, seconds
        peak=False,  # the parent allocates nothing: targets() fills in the ranks' peaks
    )


def cases(ctx: Context) -> list[Case]:
    return [case(ctx, cfg) for cfg in _sizes(ctx)]


def targets(ctx: Context, results: dict[str, CaseResult]) -> list[Target]:
    """Set at GRADED: maskkern's per-rank peak <= 0.1 × the gathered-logits eager's, its time <= 1.0 ×
    eager's (indicative at a quick run's shape). The table's memory column gets the ranks' peaks
    here."""
    _collect_peaks()
    for case_name, peaks in _PEAKS.items():
        r = results.get(case_name)
        for provider, peak in peaks.items():
            m = r and r.times.get((provider, "step"))
            if m:
                m.peak_bytes = peak
    cfg = _sizes(ctx)[-1]
    r = results.get(name(cfg))
    ours = r and r.times.get(("maskkern", "step"))
    theirs = r and r.times.get(("eager", "step"))
    mem = ours and theirs and ours.peak_bytes and theirs.peak_bytes and ours.peak_bytes / theirs.peak_bytes
    label = f"vocab_parallel_linear_cross_entropy step {name(cfg)}"
    at = {"set_at": name(GRADED), "measured_at": name(cfg)}
    time = r and r.ratio("maskkern", "step", "eager")
    return [
        Target(f"{label}: peak memory per rank / gathered logits'", mem or None, 0.1, "<=", "", **at),
        Target(f"{label}: time / gathered logits'", time, 1.0, "<=", "", **at),
    ]


# --- the headline, once ------------------------------------------------------------------------


def headline() -> int:
    """The issue's size, one step per provider; writes distributed_headline.md (the table) and .csv
    (the harness's columns: time in ms, memory in MB, per provider that ran)."""
    from _report import CSV_COLUMNS, RESULTS, device_name, device_slug, versions

    cfg = HEADLINE
    n, v = cfg["N"], cfg["V"]
    v_r = v // WORLD
    # Per-rank peaks on paper: eager holds the (N, V) logits twice (gathered, concatenated), their
    # log-softmax and its gradient; loss_parallel the (N, V_r) logits, log-softmax, gradient, a temp.
    paper = {"maskkern": 0, "eager": 4 * n * v * 4 + n * v_r * 4, "loss_parallel": 4 * n * v_r * 4}
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    pool = Pool(cfg, _threads())
    rows = []
    try:
        for provider in PROVIDERS:
            if WORLD * paper[provider] > 0.6 * avail:
                gib = paper[provider] / 2**30
                rows.append(
                    (provider, None, None, f"not run: {WORLD} × ~{gib:.1f} GiB on paper > free memory")
                )
                continue
            t0 = time.perf_counter()
            loss = pool.send("step", provider)[0]
            seconds = time.perf_counter() - t0
            peak = max(pool.send("peak", provider))
            rows.append((provider, seconds, peak, f"loss {loss:.6f}"))
            print(rows[-1], file=sys.stderr)
    finally:
        pool.close()
    lines = [
        f"# {KERNEL} headline: N={n} H={cfg['H']} V={v} float32, {WORLD} gloo ranks × {_threads()} threads",
        "",
        "| provider | step (s) | peak per rank (MB) | note |",
        "| --- | --- | --- | --- |",
    ]
    for provider, seconds, peak, note in rows:
        s = "—" if seconds is None else f"{seconds:.1f}"
        p = "—" if peak is None else f"{peak / 2**20:.0f}"
        lines.append(f"| {provider} | {s} | {p} | {note} |")
    lines.append(
        "\nPeaks per rank on paper (MB): "
        + ", ".join(f"{p} {b / 2**20:.0f}" for p, b in paper.items() if b)
        + f"; free memory at the start {avail / 2**20:.0f} MB (MB = 2^20 bytes, as in the harness's tables)."
    )
    text = "\n".join(lines) + "\n"
    print(text)
    cpu = torch.device("cpu")
    out = RESULTS / device_slug(cpu)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed_headline.md").write_text(text)
    config = json.dumps(dict(cfg, dtype="float32", ranks=WORLD, ignored=IGNORED, threads_per_rank=_threads()))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    run = dict(kernel=f"{KERNEL}_headline", mode="step", x_name="N", x=n, config=config)
    run |= dict(device=device_name(cpu), versions=versions(), timestamp=stamp)
    with open(out / "distributed_headline.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        for provider, seconds, peak, _ in rows:
            for metric, unit, value in (
                ("time", "ms", seconds and seconds * 1e3),
                ("memory", "MB", peak and peak / 2**20),
            ):
                if value is not None:
                    writer.writerow(
                        run
                        | dict(provider=provider, metric=metric, unit=unit, p50=value, p20=value, p80=value)
                    )
    return 0


if __name__ == "__main__":
    if "--headline" in sys.argv:
        raise SystemExit(headline())
    raise SystemExit(main([sys.modules[__name__]]))
