"""``python -m maskkern.info``: versions, and which backends are available here (and why not)."""

from __future__ import annotations

import platform

import torch

import maskkern


def info() -> str:
    """A human-readable report of versions and backend availability."""
    lines = [
        f"maskkern {maskkern.__version__}",
        f"python   {platform.python_version()} ({platform.machine()})",
        f"torch    {torch.__version__} (cuda {torch.version.cuda}, "
        f"{torch.cuda.device_count()} device(s), {torch.get_num_threads()} CPU threads)",
    ]
    try:
        import triton

        lines.append(f"triton   {triton.__version__}")
    except ImportError:
        lines.append("triton   not installed")
    if torch.cuda.is_available():
        lines.append(f"gpu      {torch.cuda.get_device_name()}")
    from maskkern._backend import _cpu_supports, cpu_capability

    lines.append(f"cpu      kernels {cpu_capability() or 'not loaded'} (this CPU supports {_cpu_supports()})")
    lines.append("backends:")
    for name, status in maskkern.backends().items():
        lines.append(f"  {name:7s} {'yes' if status.available else 'no ':3s}  {status.reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(info())
