"""NeuralSort and SoftSort against the formulas written out directly (the reference's O(n^3) form)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascadelab.operators import neural_sort, soft_sort

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
HSET = settings(max_examples=15, deadline=None)
OPS = [neural_sort, soft_sort]


def ref_neural_sort(s: torch.Tensor, tau: float) -> torch.Tensor:
    """Grover et al. eq. (5) as in the LCRON code: B = |s_i - s_j| @ 1 1^T (O(n^3))."""
    n = s.shape[-1]
    a = (s.unsqueeze(-1) - s.unsqueeze(-2)).abs()
    b = a @ torch.ones(n, n, dtype=s.dtype, device=s.device)  # B[j, r] = sum_l |s_j - s_l|
    scal = (n + 1 - 2 * torch.arange(1, n + 1, dtype=s.dtype, device=s.device)).unsqueeze(-1)
    return torch.softmax((scal * s.unsqueeze(-2) - b.transpose(-1, -2)) / tau, dim=-1)


def ref_soft_sort(s: torch.Tensor, tau: float) -> torch.Tensor:
    n = s.shape[-1]
    out = torch.empty(*s.shape, n, dtype=s.dtype, device=s.device)
    srt = torch.sort(s, -1, descending=True).values
    for r in range(n):
        out[..., r, :] = torch.softmax(-(srt[..., r:r + 1] - s).abs() / tau, -1)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1,), (5,), (3, 8), (2, 2, 11)])
@pytest.mark.parametrize("tau", [0.1, 1.0, 50.0])
def test_matches_reference(device, shape, tau):
    s = (3 * torch.randn(shape, dtype=torch.float64)).to(device)
    torch.testing.assert_close(neural_sort(s, tau), ref_neural_sort(s, tau))
    torch.testing.assert_close(soft_sort(s, tau), ref_soft_sort(s, tau))


@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op):
    s = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: op(x, 0.8), (s,))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_dtypes_on_cpu(op, dtype):
    s = torch.randn(3, 9).to(dtype).requires_grad_()
    p = op(s, 1.0)
    assert p.dtype == dtype and p.shape == (3, 9, 9)
    ref = ref_neural_sort if op is neural_sort else ref_soft_sort
    torch.testing.assert_close(p.double(), ref(s.detach().double(), 1.0), atol=3e-2, rtol=3e-2)
    p.float().sum().backward()
    assert torch.isfinite(s.grad.float()).all()


@HSET
@pytest.mark.parametrize("op", OPS)
@given(n=st.integers(1, 8), data=st.data())
def test_properties(op, n, data):
    s = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    p = op(s, 0.5)
    assert torch.all((p >= 0) & (p <= 1))
    torch.testing.assert_close(p.sum(-1), torch.ones(2, n, dtype=torch.float64))
    perm = torch.tensor(data.draw(st.permutations(range(n))))
    torch.testing.assert_close(op(s[:, perm], 0.5), p[:, :, perm])  # columns follow the items
    gaps = torch.sort(s, -1).values.diff(dim=-1)
    if n == 1 or gaps.min() > 1e-3:
        assert torch.equal(op(s, 1e-5).argmax(-1), torch.argsort(s, -1, descending=True))
