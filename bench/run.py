"""maskkern's main job: every benchmark in bench/ on whatever device is present (``make bench``).

Discovers the ``bench/bench_*.py`` modules (each defines KERNEL, cases() and maybe targets(), see
bench/_harness.py), runs them in one process with one progress bar, prints a markdown table per op
and the summary of targets, and writes bench/results/<device>/ (``--quick``: bench/results/tmp/).

    python bench/run.py [--quick] [--only masked_softmax,...] [--threads N] [--backend torch] [--out DIR]
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path
from types import ModuleType

from _harness import main


def discover() -> list[ModuleType]:
    """The bench modules in name order (bench/ is on sys.path when this file runs). One that fails
    to import is reported and left out, so one broken script does not stop the suite."""
    modules = []
    for path in sorted(Path(__file__).resolve().parent.glob("bench_*.py")):
        try:
            modules.append(importlib.import_module(path.stem))
        except Exception:
            print(
                f"[bench] skipping {path.name}, it failed to import:\n{traceback.format_exc()}",
                file=sys.stderr,
            )
    return modules


if __name__ == "__main__":
    raise SystemExit(main(discover(), suite=True))
