"""The CPU kernels are built once per instruction-set level (setup.py) and the widest one this CPU
supports is loaded (maskkern/_backend.py): every level this CPU can run passes the op tests, and
MASKKERN_CPU_CAPABILITY picks a lower one. scripts/portable_check.sh runs a wheel on an emulated
CPU without AVX-512."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import maskkern
from maskkern._backend import CPU_CAPABILITIES, _cpu_supports, cpu_capability

ROOT = Path(__file__).resolve().parents[1]
LOWER = CPU_CAPABILITIES[: CPU_CAPABILITIES.index(_cpu_supports())]  # the widest runs in the suite
# The cpu backend's op tests, without the slow gradcheck and compile cases (the widest level runs
# those in the main suite).
OP_TESTS = [
    "tests/test_masked_softmax.py",
    "tests/test_attention.py",
    "tests/test_varlen_attention.py",
    "tests/test_masked_cross_entropy.py",
    "tests/test_linear_cross_entropy.py",
    "tests/test_pad_embedding.py",
]


def _run(code: str, level: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASKKERN_CPU_CAPABILITY": level}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_the_widest_level_this_cpu_supports_is_loaded():
    if not maskkern.backends()["cpu"].available:
        pytest.skip("the CPU kernels are not built")
    assert cpu_capability() == _cpu_supports()
    assert f"_cpu_{cpu_capability()}" in maskkern.backends()["cpu"].reason


@pytest.mark.parametrize("level", LOWER)
def test_a_lower_level_is_picked_by_the_environment(level):
    run = _run("from maskkern._backend import cpu_capability; print(cpu_capability())", level)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == level


def test_an_unknown_level_turns_the_cpu_backend_off_with_the_reason():
    code = "import maskkern; s = maskkern.backends()['cpu']; print(s.available, s.reason)"
    run = _run(code, "sse9")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("False") and "MASKKERN_CPU_CAPABILITY" in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("level", LOWER)
def test_op_tests_pass_at_a_lower_level(level):
    env = {**os.environ, "MASKKERN_CPU_CAPABILITY": level}
    selection = "cpu-cpu and not gradcheck and not compile and not opcheck"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *OP_TESTS, "-q", "-x", "-p", "no:cacheprovider", "-k", selection],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
