"""End to end on CPU: bench/lm_model.py's byte-level LM trained a few steps on padded lines of the
standard library, eager PyTorch vs maskkern from identical parameters — the losses of every step and
the gradients of every parameter after the first step agree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from .utils import backend_device_params

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from lm_model import PAD, LMConfig, TinyLM, batches, grad_step, maskkern_twin, stdlib_lines

CPU_BACKENDS = [b for b, device in backend_device_params() if device == "cpu"]
CFG = LMConfig(dim=32, layers=2, heads=2, max_len=32)
BATCH, STEPS, SEED = 6, 2, 0
# fp32 end to end: the fp32 tolerance of tests/utils.py, with an atol for gradients that are ~0.
# maskkern rounds differently from eager in a few places (q scaled before q·kᵀ rather than the
# scores after; softmax and cross-entropy fused), ~1 ulp each: measured differences are < 1e-7
# relative. A pad leaking into attention or the loss moves the loss by > 1e-2, gradients by O(1).
RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def data() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    stream = batches(stdlib_lines(CFG.max_len), BATCH, SEED)
    return [next(stream) for _ in range(STEPS)]


def test_batches_are_ragged_padded_and_deterministic(data):
    ids, targets, lengths = data[0]
    L = ids.shape[1]
    assert lengths.min() < lengths.max() == L, "padded to the longest line of the batch"
    assert min(len(line) for line in stdlib_lines(CFG.max_len)) >= 2, "every line has an input token"
    real = torch.arange(L) < lengths[:, None]
    assert (ids[real] != PAD).all() and (targets[real] != PAD).all()
    assert (ids[~real] == PAD).all() and (targets[~real] == PAD).all()
    # targets are the inputs shifted by one byte
    assert torch.equal(targets[:, :-1][real[:, 1:]], ids[:, 1:][real[:, 1:]])
    again = next(batches(stdlib_lines(CFG.max_len), BATCH, SEED))
    assert all(torch.equal(a, b) for a, b in zip(again, data[0], strict=True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_losses_and_gradients_agree_with_eager(backend, data):
    torch.manual_seed(SEED)
    eager = TinyLM(CFG)
    fused = maskkern_twin(eager, backend)
    opts = [torch.optim.AdamW(m.parameters(), lr=2e-3) for m in (eager, fused)]
    for step, batch in enumerate(data):
        loss, ref = grad_step(fused, *batch), grad_step(eager, *batch)
        assert torch.isfinite(ref), "the eager model must not produce NaN on padded rows"
        torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL, msg=f"loss of step {step + 1}")
        if step == 0:
            params = dict(fused.named_parameters())
            for name, p in eager.named_parameters():
                torch.testing.assert_close(params[name].grad, p.grad, rtol=RTOL, atol=ATOL, msg=name)
            pad_row = params["embed.weight"].grad[PAD]
            assert torch.equal(pad_row, torch.zeros_like(pad_row)), "the PAD row gets no gradient"
        for opt in opts:
            opt.step()
