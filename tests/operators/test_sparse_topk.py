"""Sparse soft top-k (p = 2) against an independent pool-adjacent-violators reference in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascadelab.operators import hard_topk_mask, sparse_topk

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
HSET = settings(max_examples=30, deadline=None)


def isotonic_decreasing(y: np.ndarray) -> np.ndarray:
    """argmin_{v_1 >= ... >= v_n} ||v - y||^2 by pool-adjacent-violators."""
    sums, counts = [], []
    for value in y:
        sums.append(float(value))
        counts.append(1)
        while len(sums) > 1 and sums[-2] / counts[-2] < sums[-1] / counts[-1]:
            s, c = sums.pop(), counts.pop()
            sums[-1] += s
            counts[-1] += c
    return np.concatenate([np.full(c, s / c) for s, c in zip(sums, counts, strict=True)])


def ref_sparse_topk(x: np.ndarray, k: int, l: float) -> np.ndarray:
    """Sander et al.: y = z - PAV(sort(z) - w) unsorted, z = x / l, w = (1,..,1 (k), 0,..,0)."""
    z = x / l
    order = np.argsort(-z, kind="stable")
    u = z[order]
    w = (np.arange(len(x)) < k).astype(float)
    out = np.empty_like(z)
    out[order] = u - isotonic_decreasing(u - w)
    return out


@HSET
@given(n=st.integers(1, 12), data=st.data())
def test_matches_pav_reference(n, data):
    k = data.draw(st.integers(1, n))
    l = data.draw(st.floats(0.05, 20.0))
    rng = np.random.default_rng(data.draw(st.integers(0, 10_000)))
    x = rng.normal(size=(3, n)) * rng.choice([0.1, 1.0, 10.0])
    y = sparse_topk(torch.from_numpy(x), k, l)
    for r in range(3):
        np.testing.assert_allclose(y[r].numpy(), ref_sparse_topk(x[r], k, l), atol=1e-10)
    assert torch.all((y >= 0) & (y <= 1))
    torch.testing.assert_close(y.sum(-1), torch.full((3,), float(k), dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_batched_leading_dims_and_per_row_k(device):
    x = torch.randn(2, 3, 10, dtype=torch.float64, device=device)
    k = torch.tensor([[1, 4, 10], [3, 12, 5]], device=device)
    y = sparse_topk(x, k, 0.5)
    assert y.shape == x.shape
    for i in range(2):
        for j in range(3):
            kk = min(int(k[i, j]), 10)
            np.testing.assert_allclose(y[i, j].cpu().numpy(), ref_sparse_topk(x[i, j].cpu().numpy(), kk, 0.5),
                                       atol=1e-10)


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = (torch.randperm(14, generator=g)[:7].double() / 3).reshape(1, 7).repeat(2, 1)
    x[1] = x[1].flip(0)
    x.requires_grad_()
    for l in (0.5, 2.0, 10.0):
        assert torch.autograd.gradcheck(lambda v, l=l: sparse_topk(v, 3, l), (x,))


def test_sparsity_and_hard_limit():
    x = torch.tensor([[5.0, 4.9, 0.0, -3.0, 10.0]], dtype=torch.float64)
    y = sparse_topk(x, 2, 1.0)
    assert y[0, 4] == 1 and y[0, 2] == 0 and y[0, 3] == 0  # exact zeros and ones
    torch.testing.assert_close(y[0, :2], torch.tensor([0.55, 0.45], dtype=torch.float64))
    s = torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(sparse_topk(s, 3, 1e-6), hard_topk_mask(s, 3).double())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_dtypes_on_cpu(dtype):
    x = torch.randn(4, 20).to(dtype).requires_grad_()
    y = sparse_topk(x, 5, 1.0)
    assert y.dtype == dtype
    ref = np.stack([ref_sparse_topk(r, 5, 1.0) for r in x.detach().double().numpy()])
    np.testing.assert_allclose(y.detach().double().numpy(), ref, atol=2e-2)
    y.float().pow(2).sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


@HSET
@given(n=st.integers(2, 10), data=st.data())
def test_monotone_and_equivariant(n, data):
    k = data.draw(st.integers(1, n - 1))
    x = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    y = sparse_topk(x, k, 1.0)
    perm = torch.tensor(data.draw(st.permutations(range(n))))
    torch.testing.assert_close(sparse_topk(x[:, perm], k, 1.0), y[:, perm])
    i = data.draw(st.integers(0, n - 1))
    x2 = x.clone()
    x2[:, i] += data.draw(st.floats(0.01, 3.0))
    assert torch.all(sparse_topk(x2, k, 1.0)[:, i] >= y[:, i] - 1e-12)
