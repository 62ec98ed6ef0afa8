"""The CPU output cache (csrc/cpu/output_memory.h, maskkern.memory): freed outputs are reused,
reported to the profiler, resizable, released by empty_cache, and off with MASKKERN_CPU_CACHE_MB=0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import maskkern as mk

pytestmark = pytest.mark.skipif(not mk.backends()["cpu"].available, reason="maskkern._C not built")

SHAPE = (2, 4, 256, 300)  # 2.3 MiB of fp32: above the 1 MiB the cache starts at


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return mk.masked_softmax(x, lengths=torch.tensor([100, 300]), backend="cpu")


def test_a_freed_output_is_reused_and_correct():
    x = torch.randn(SHAPE)
    first = _softmax(x)
    ptr = first.data_ptr()
    expected = first.clone()
    del first
    again = _softmax(x)
    assert again.data_ptr() == ptr  # the same block, already faulted in
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_outputs_alive_together_get_their_own_blocks():
    x = torch.randn(SHAPE)
    outs = [_softmax(x) for _ in range(3)]
    assert len({o.data_ptr() for o in outs}) == 3
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)


def test_empty_cache_releases_freed_blocks():
    out = _softmax(torch.randn(SHAPE))
    nbytes = out.nbytes
    del out
    released = mk.empty_cache()
    assert released >= nbytes  # rounded up to whole 2 MiB blocks
    assert mk.empty_cache() == 0


def test_the_profiler_sees_the_allocation():
    x = torch.randn(SHAPE)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        out = _softmax(x)
        del out
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage]
    assert max(sizes) >= x.nbytes and min(sizes) <= -x.nbytes


def test_a_cached_output_resizes_like_any_tensor():
    x = torch.randn(SHAPE)
    out = _softmax(x)
    expected = out.clone()
    out.resize_(2 * out.numel())  # reallocated by the CPU allocator; the cached block goes back
    torch.testing.assert_close(out[: expected.numel()].view(SHAPE), expected, rtol=0, atol=0)


def test_the_cache_can_be_turned_off():
    code = (
        "import torch, maskkern as mk\n"
        "x = torch.randn(2, 4, 256, 300)\n"
        "out = mk.masked_softmax(x, backend='cpu'); del out\n"
        "print(mk.empty_cache())\n"
    )
    env = {**os.environ, "MASKKERN_CPU_CACHE_MB": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "0"


def test_bypassed_outputs_leave_the_cache_alone():
    x = torch.randn(SHAPE)
    mk.empty_cache()
    out = _softmax(x)
    cached_ptr = out.data_ptr()
    del out  # cached
    with mk.memory.cache_bypassed():
        fresh = _softmax(x)
        assert fresh.data_ptr() != cached_ptr
        del fresh  # back to the OS
    assert mk.empty_cache() == 4 << 20  # only the first output's block: 2.3 MiB rounded up
