"""Differentiable sorting networks: they sort, match a dense per-comparator reference, and differentiate."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascadelab.operators import diff_sort

DS = sys.modules["cascadelab.operators.diffsort"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
HSET = settings(max_examples=12, deadline=None)
NETWORKS = ["odd_even", "bitonic"]


def comparators(n: int, network: str) -> list[list[tuple[int, int]]]:
    """(winner, loser) wire pairs per layer; bitonic on the next power of two (wires >= n are -inf pads)."""
    if network == "odd_even":
        return [[(i, i + 1) for i in range(layer % 2, n - 1, 2)] for layer in range(n)]
    size = 1 << max(0, (n - 1).bit_length())
    layers, block = [], 2
    while block <= size:
        stride = block // 2
        while stride:
            layers.append([(i, i ^ stride) if i & block == 0 else (i ^ stride, i)
                           for i in range(size) if (i ^ stride) > i])
            stride //= 2
        block *= 2
    return layers


def ref_diff_sort(s: torch.Tensor, steepness: float, network: str) -> torch.Tensor:
    """Dense reference for one list (n,): explicit -inf padding, a full mixing matrix per layer, then crop."""
    n = s.shape[0]
    size = n if network == "odd_even" else 1 << max(0, (n - 1).bit_length())
    x = torch.cat([s, torch.full((size - n,), -math.inf, dtype=s.dtype)])
    perm = torch.eye(size, dtype=s.dtype)
    for layer in comparators(n, network):
        mix = torch.eye(size, dtype=s.dtype)
        for a, b in layer:
            if math.isinf(x[a]) and math.isinf(x[b]):
                p = torch.tensor(1.0, dtype=s.dtype)
            elif math.isinf(x[b]):
                p = torch.tensor(1.0, dtype=s.dtype)
            elif math.isinf(x[a]):
                p = torch.tensor(0.0, dtype=s.dtype)
            else:
                p = 0.5 + torch.atan(steepness * (x[a] - x[b])) / math.pi
            mix[a, a], mix[a, b], mix[b, a], mix[b, b] = p, 1 - p, 1 - p, p
        pad = (mix @ torch.isinf(x).to(s.dtype)) > 0.5  # pads move only by hard swaps
        x = torch.where(pad, -math.inf, mix @ torch.nan_to_num(x, neginf=0.0))  # the VALUES are updated
        perm = mix @ perm
    return perm[:n, :n]


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("n", [1, 3, 5, 8])
def test_matches_dense_reference(network, n):
    s = torch.randn(3, n, dtype=torch.float64)
    p = diff_sort(s, 3.0, network)
    for r in range(3):
        torch.testing.assert_close(p[r], ref_diff_sort(s[r], 3.0, network))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("n", [2, 7, 16, 33])
def test_high_steepness_reproduces_the_order(device, network, n):
    s = torch.randperm(4 * n)[:n].double().reshape(1, n).expand(4, n).clone().to(device)
    s[1:] = s[1:, torch.randperm(n)]
    p = diff_sort(s, 1e4, network)
    assert torch.equal(p.argmax(-1), torch.argsort(s, -1, descending=True))
    ones = torch.ones(4, n, dtype=torch.float64, device=device)
    torch.testing.assert_close(p.sum(-1), ones)  # doubly stochastic
    torch.testing.assert_close(p.sum(-2), ones)


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("relaxation", ["cauchy", "logistic", "gaussian", "reciprocal"])
def test_gradcheck(network, relaxation):
    s = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: diff_sort(x, 2.0, network, relaxation), (s,))


def test_checkpointed_segments_give_the_same_gradient(monkeypatch):
    s = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 6, 6, dtype=torch.float64)
    (g_plain,) = torch.autograd.grad((diff_sort(s, 2.0) * w).sum(), s)
    monkeypatch.setattr(DS, "_CHECKPOINT_BYTES", 0)
    (g_ckpt,) = torch.autograd.grad((diff_sort(s, 2.0) * w).sum(), s)
    torch.testing.assert_close(g_ckpt, g_plain)


def test_values_are_updated_between_layers():
    """The DFTopK copy compared the original values in every layer; then [6 7 2 5 0 3 1 4]-style inputs fail."""
    s = torch.tensor([[0.3, -1.2, 2.0, 0.1, -0.4, 1.1, 2.5, 1.7]], dtype=torch.float64)
    assert torch.equal(diff_sort(s, 1000.0).argmax(-1)[0], torch.argsort(s[0], descending=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_dtypes_on_cpu(dtype):
    s = torch.randn(2, 6).to(dtype).requires_grad_()
    p = diff_sort(s, 5.0)
    assert p.dtype == dtype and p.shape == (2, 6, 6)
    p.float().sum().backward()
    assert torch.isfinite(s.grad.float()).all()


@HSET
@pytest.mark.parametrize("network", NETWORKS)
@given(n=st.integers(1, 9), data=st.data())
def test_properties(network, n, data):
    """Values in [0, 1], doubly stochastic; equivariant in the hard limit (a soft network is not exactly
    permutation-equivariant: which wires meet depends on the input order)."""
    s = torch.randperm(3 * n, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))[:n]
    s = s.double().unsqueeze(0)
    p = diff_sort(s, 4.0, network)
    assert torch.all((p >= 0) & (p <= 1 + 1e-12))
    torch.testing.assert_close(p.sum(-1), torch.ones(1, n, dtype=torch.float64))
    torch.testing.assert_close(p.sum(-2), torch.ones(1, n, dtype=torch.float64))
    perm = torch.tensor(data.draw(st.permutations(range(n))))
    hard = diff_sort(s, 1e6, network)
    torch.testing.assert_close(diff_sort(s[:, perm], 1e6, network), hard[:, :, perm], atol=1e-4, rtol=0)
