"""Every bench script's plan builds for a CPU and for a GPU: cases() and targets() run here, on CPU,
once with a Context that says it is on a GPU (nothing is measured, and no input tensor is built);
every target names the case it was set for, and a full plan measures each one there.
The GPU branches otherwise run only when a GPU is lent, for minutes, and a Python error in one
would cost that run."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"

# In a process of its own: importing the harness raises torch.compile's recompile limits globally.
SCRIPT = """
import sys
from pathlib import Path

import torch

sys.path.insert(0, sys.argv[1])
import _harness as h
import run


class GpuContext(h.Context):
    on_gpu = property(lambda self: True)
    copy_gbps = property(lambda self: 1000.0)


for context in (h.Context, GpuContext):
    for quick in (True, False):
        ctx = context(torch.device("cpu"), quick, None, Path(sys.argv[2]), plots=False)
        for module in run.discover():
            cases = module.cases(ctx)
            names = [c.name for c in cases]
            assert cases and len(set(names)) == len(names), (module.KERNEL, names)
            for c in cases:
                assert {"maskkern", "eager"} <= set(c.providers), (module.KERNEL, c.name, list(c.providers))
            # train_lm's targets() trains its two models: a measurement, not part of a plan.
            plain = hasattr(module, "targets") and module.KERNEL != "train_lm"
            targets = module.targets(ctx, {}) if plain else []
            assert all(t.measured is None for t in targets), (module.KERNEL, targets)
            # Every target names the case it was set for, and a full run measures each one there.
            assert all(t.set_at for t in targets), (module.KERNEL, targets)
            assert quick or not any(t.indicative for t in targets), (module.KERNEL, targets)
            indicative = sum(t.indicative for t in targets)
            print(context.__name__, quick, module.KERNEL, len(cases), "cases", len(targets), "targets",
                  indicative, "indicative")  # fmt: skip
print("ok")
"""


def test_every_bench_plan_builds_for_cpu_and_gpu(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(BENCH), str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-5000:] + run.stderr[-5000:]
