"""The README's example runs as printed: its first ```python block, executed as a script."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def test_readme_example_runs():
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(_example(), str(README), "exec"), namespace)
    loss, emb = namespace["loss"], namespace["emb"]
    assert loss.isfinite()
    assert emb.grad is not None and emb.grad.isfinite().all()
