"""Test setup. TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here, before
maskkern (and its Triton kernels) is imported: on a machine without a GPU the triton backend is
tested in the CPU interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import settings

# A fixed, bounded hypothesis profile keeps the suite fast and reproducible in CI.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    from maskkern.info import info

    return info().splitlines()
