"""LapSum soft top-k against a bisection reference written from the definition, plus properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascadelab.operators import hard_topk_mask, lapsum_topk

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
HSET = settings(max_examples=25, deadline=None)


def laplace_cdf(d: torch.Tensor) -> torch.Tensor:
    e = 0.5 * torch.exp(-d.abs())  # no overflow on either side, so autograd through it stays finite
    return torch.where(d > 0, 1 - e, e)


def ref_threshold(s: torch.Tensor, k, alpha: float) -> torch.Tensor:
    """t with sum_i F(s_i/alpha - t) = k, by 90 bisection steps in float64. Returns (..., 1)."""
    y = s.double() / alpha
    k = torch.as_tensor(k, dtype=torch.float64).expand(s.shape[:-1]).unsqueeze(-1)
    lo = y.amin(-1, keepdim=True) - 60
    hi = y.amax(-1, keepdim=True) + 60
    for _ in range(90):
        mid = 0.5 * (lo + hi)
        above = laplace_cdf(y - mid).sum(-1, keepdim=True) > k
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def ref_lapsum(s: torch.Tensor, k, alpha: float) -> torch.Tensor:
    """The LapSum mask from its definition: F(s / alpha - t) with t from :func:`ref_threshold`."""
    return laplace_cdf(s.double() / alpha - ref_threshold(s, k, alpha))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k", [(2, 1), (5, 0.5), (5, 4.8), (40, 10), (40, 39), (120, 60)])
@pytest.mark.parametrize("alpha", [0.05, 1.0, 5.0])
def test_matches_reference(device, n, k, alpha):
    s = (3 * torch.randn(8, n, dtype=torch.float64)).to(device)
    p = lapsum_topk(s, k, alpha)
    torch.testing.assert_close(p, ref_lapsum(s, k, alpha).to(device), atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(p.sum(-1), torch.full((8,), float(k), dtype=torch.float64, device=device))


def test_gradcheck():
    s = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lapsum_topk(x, 3, 0.7), (s,))
    k = torch.tensor([[1, 3, 6], [2, 5, 9]])  # 9 >= n: that row is all ones with zero gradient
    assert torch.autograd.gradcheck(lambda x: lapsum_topk(x, k, 0.3), (s,))


def test_per_row_k_and_k_at_least_n():
    s = torch.randn(4, 7, dtype=torch.float64)
    k = torch.tensor([1.0, 2.5, 7.0, 11.0])
    p = lapsum_topk(s, k, 1.0)
    torch.testing.assert_close(p.sum(-1), torch.tensor([1.0, 2.5, 7.0, 7.0], dtype=torch.float64))
    assert torch.all(p[2:] == 1)
    torch.testing.assert_close(p[:2], ref_lapsum(s[:2], k[:2], 1.0))


def test_large_logit_scale_no_overflow():
    s = torch.tensor([[-4000.0, 3000.0, 10.0, 10.5]], dtype=torch.float32)
    p = lapsum_topk(s, 2, 0.01)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, torch.tensor([[0.0, 1.0, 0.0, 1.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch,n", [(6, 50), (40, 600)])
def test_rows_too_wide_for_the_exp_sums_take_the_log_space_solve(batch, n):
    s = torch.randn(batch, n, dtype=torch.float64)
    s[::3] *= 400.0  # half-range / alpha far above 300: e^(y - mid) would overflow float64
    k = torch.randint(1, n, (batch,)).double()
    p = lapsum_topk(s, k, 0.5)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, ref_lapsum(s, k, 0.5), atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(p.sum(-1), k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_dtypes_on_cpu(dtype):
    s = torch.randn(5, 30).to(dtype).requires_grad_()
    p = lapsum_topk(s, 6, 0.5)
    assert p.dtype == dtype
    torch.testing.assert_close(p.double(), ref_lapsum(s.detach().float(), 6, 0.5), atol=1e-2, rtol=1e-2)
    p.float().pow(2).sum().backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()


@HSET
@given(n=st.integers(2, 10), data=st.data())
def test_properties(n, data):
    k = data.draw(st.integers(1, n - 1))
    s = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    p = lapsum_topk(s, k, 0.5)
    assert torch.all((p >= 0) & (p <= 1))
    torch.testing.assert_close(p.sum(-1), torch.full((3,), float(k), dtype=torch.float64))
    perm = torch.tensor(data.draw(st.permutations(range(n))))
    torch.testing.assert_close(lapsum_topk(s[:, perm], k, 0.5), p[:, perm])
    i = data.draw(st.integers(0, n - 1))
    s2 = s.clone()
    s2[:, i] += data.draw(st.floats(0.01, 3.0))
    assert torch.all(lapsum_topk(s2, k, 0.5)[:, i] >= p[:, i] - 1e-12)
    gaps = torch.sort(s, -1).values.diff(dim=-1).min()
    if gaps > 1e-3:  # alpha -> 0: the hard top-k mask
        torch.testing.assert_close(lapsum_topk(s, k, float(gaps) / 100), hard_topk_mask(s, k).double(),
                                   atol=1e-3, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_values_and_gradient_against_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(40, 600, generator=g)
    s[::4] *= 400.0  # wide rows: the log-space solve
    s.requires_grad_()
    p = lapsum_topk(s, 7, 0.5)
    torch.testing.assert_close(p.double(), ref_lapsum(s.detach(), 7, 0.5), atol=1e-4, rtol=1e-4)  # float32 y ~ 1e3
    w = torch.randn(40, 600, generator=g, dtype=torch.float64)
    (p * w).sum().backward()
    sd = s.detach().double().requires_grad_()
    (ref_lapsum_diff(sd, 7, 0.5) * w).sum().backward()  # implicit-function gradient of the reference
    torch.testing.assert_close(s.grad.double(), sd.grad, atol=1e-4, rtol=1e-3)


def ref_lapsum_diff(s: torch.Tensor, k, alpha: float) -> torch.Tensor:
    """The reference with the threshold's gradient: t from bisection, then one Newton step under autograd
    (at the root, d t / d y_j = f_j / sum f, the implicit-function gradient)."""
    y = s / alpha
    with torch.no_grad():
        t0 = ref_threshold(s, k, alpha)
    f = 0.5 * torch.exp(-(y - t0).abs())
    t = t0 + (laplace_cdf(y - t0).sum(-1, keepdim=True) - k) / f.sum(-1, keepdim=True)
    return laplace_cdf(y - t)
