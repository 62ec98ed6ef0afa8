"""Every Triton kernel compiles for a GPU (sm_90), on this machine too, which has none.

The other tests run the Triton kernels in Triton's interpreter, which accepts code that the
compiler rejects: until this test, the cross-entropy kernel retyped its ``smoothing`` parameter in
one branch, which the interpreter ran and the compiler refuses. scripts/triton_compile.py compiles
each kernel's specializations through ptxas in a process of its own (TRITON_INTERPRET unset).
"""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "triton_compile.py"


def test_every_triton_kernel_compiles_for_sm90():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert "cases compiled for sm_90" in run.stdout
