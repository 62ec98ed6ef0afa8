"""maskkern.backends(), backend resolution, `python -m maskkern.info`, and the import fallback."""

import os
import subprocess
import sys

import pytest
import torch

import maskkern as mk
from maskkern._backend import BACKENDS, resolve_backend


def test_backends_reports_every_backend_with_a_reason():
    status = mk.backends()
    assert tuple(status) == BACKENDS
    assert status["torch"].available
    for s in status.values():
        assert isinstance(s.reason, str) and s.reason


def test_cpu_default_and_errors():
    cpu = torch.device("cpu")
    assert resolve_backend(None, cpu) in ("cpu", "torch")
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("numpy", cpu)
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, ValueError), match="cuda"):
            resolve_backend("cuda", cpu)


def test_info_prints_versions_and_backends():
    out = subprocess.run(
        [sys.executable, "-m", "maskkern.info"], capture_output=True, text=True, check=True
    ).stdout
    assert "torch" in out and "backends:" in out
    for name in BACKENDS:
        assert name in out


def test_package_works_without_the_extension(tmp_path):
    """With maskkern._C unimportable the package still imports and runs through `torch`."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'maskkern._C':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    code = (
        "import torch, maskkern as mk\n"
        "assert not mk.backends()['cpu'].available\n"
        "y = mk.masked_softmax(torch.randn(2, 3), causal=True)\n"
        "assert torch.allclose(y.sum(-1), torch.ones(2))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
