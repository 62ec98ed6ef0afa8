"""maskkern.masks: each factory equals the eager expression its docstring names."""

import pytest
import torch

from maskkern import masks


def test_padding_mask():
    ids = torch.tensor([[5, 0, 3], [0, 0, 1]])
    assert torch.equal(masks.padding_mask(ids), ids != 0)
    assert torch.equal(masks.padding_mask(ids, pad_idx=3), ids != 3)
    with pytest.raises(TypeError, match="ids"):
        masks.padding_mask(ids.float())


def test_lengths_to_mask():
    lengths = torch.tensor([0, 2, 4])
    expected = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(masks.lengths_to_mask(lengths), expected)
    assert masks.lengths_to_mask(lengths, max_len=6).shape == (3, 6)
    assert masks.lengths_to_mask(torch.zeros(0, dtype=torch.long)).shape == (0, 0)
    with pytest.raises(ValueError, match="lengths"):
        masks.lengths_to_mask(lengths[None])
    with pytest.raises(TypeError, match="lengths"):
        masks.lengths_to_mask(lengths.float())


@pytest.mark.parametrize("Lq,Lk", [(4, 4), (3, 6), (6, 3), (1, 5), (0, 2)])
def test_causal_mask(Lq, Lk):
    ones = torch.ones(Lq, Lk, dtype=torch.bool)
    assert torch.equal(masks.causal_mask(Lq, Lk), ones.tril())
    bottom_right = masks.causal_mask(Lq, Lk, align="bottom_right")
    assert torch.equal(bottom_right, ones.tril(Lk - Lq))
    if Lq:
        assert bottom_right[-1].all()  # the last query sees every key
    assert torch.equal(masks.causal_mask(Lq), torch.ones(Lq, Lq, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="align"):
        masks.causal_mask(Lq, Lk, align="middle")


def test_causal_code():
    assert [masks.causal_code(c) for c in (False, True, "top_left", "bottom_right")] == [0, 1, 1, 2]
    for bad in ("yes", 2, None):
        with pytest.raises(ValueError, match="causal"):
            masks.causal_code(bad)


def test_combine_masks_broadcasts():
    a = torch.tensor([True, False, True])
    b = torch.tensor([[True], [False]])
    assert torch.equal(masks.combine_masks(a, None, b), a & b)
    assert masks.combine_masks(None) is None
    with pytest.raises(TypeError, match="masks"):
        masks.combine_masks(a, a.float())


def test_attention_mask_pad_and_causal():
    ids = torch.tensor([[7, 8, 0], [9, 0, 0]])
    m = masks.attention_mask(ids, causal=True)
    expected = (ids != 0)[:, None, None, :] & torch.ones(3, 3, dtype=torch.bool).tril()
    assert m.shape == (2, 1, 3, 3) and torch.equal(m, expected)
    from_lengths = masks.attention_mask(lengths=torch.tensor([2, 1]), causal=True)
    assert torch.equal(from_lengths, expected[..., :2, :2])
    with pytest.raises(ValueError):
        masks.attention_mask()


def test_to_additive():
    keep = torch.tensor([True, False])
    add = masks.to_additive(keep, torch.float16)
    assert add.dtype == torch.float16
    assert add[0] == 0 and add[1] == float("-inf")
    with pytest.raises(TypeError):
        masks.to_additive(keep.float())
