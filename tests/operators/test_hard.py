"""Hard top-k mask for evaluation."""

from __future__ import annotations

import pytest
import torch

from cascadelab.operators import hard_topk_mask

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_matches_sorted_indices(device):
    s = torch.randn(3, 4, 11, device=device)
    m = hard_topk_mask(s, 4)
    assert m.dtype == torch.bool and torch.all(m.sum(-1) == 4)
    top = torch.sort(s, -1, descending=True).indices[..., :4]
    expected = torch.zeros_like(m).scatter_(-1, top, True)
    assert torch.equal(m, expected)


def test_mask_per_row_k_and_ties():
    s = torch.tensor([[1.0, 9.0, 5.0, 5.0, 7.0], [3.0, 3.0, 3.0, 3.0, 3.0], [4.0, 1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[True, False, True, True, True], [True] * 5, [False, True, True, False, False]])
    m = hard_topk_mask(s, torch.tensor([2, 3, 5]), mask=mask)
    assert m.tolist() == [[False, False, True, False, True],  # 9 invalid; tie 5/5 -> lower index
                          [True, True, True, False, False],  # all tied -> first three
                          [False, True, True, False, False]]  # k > valid count -> every valid item
    assert not torch.any(m & ~mask)
