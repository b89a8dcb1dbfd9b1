"""DFTopK against an independent sort-based reference, plus properties, masks, k edge cases and dtypes."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cascadelab.operators import INVALID_LOGIT, SATURATION_MARGIN, dftopk, dftopk_logits, hard_topk_mask

DFT = importlib.import_module("cascadelab.operators.dftopk")  # the module (the package attribute is the function)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
HSET = settings(max_examples=25, deadline=None)


def ref_logits(s: torch.Tensor, k, tau: float, mask=None) -> torch.Tensor:
    """(s - theta)/tau with theta from a full descending sort (autograd flows through the sort gather)."""
    x = s if mask is None else s.masked_fill(~mask, -torch.inf)
    srt = torch.sort(x, dim=-1, descending=True).values
    kk = torch.as_tensor(k, device=s.device).expand(s.shape[:-1]).unsqueeze(-1)
    theta = 0.5 * srt.gather(-1, kk - 1) + 0.5 * srt.gather(-1, kk)
    z = (s - theta) / tau
    return z if mask is None else z.masked_fill(~mask, INVALID_LOGIT)


def distinct(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    base = torch.randperm(n * 4, generator=g)[:n].to(dtype) / 4  # distinct, spaced >= 0.25
    return torch.stack([base[torch.randperm(n, generator=g)] for _ in range(int(torch.tensor(shape[:-1]).prod()))]
                       ).reshape(shape).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,k", [((7,), 3), ((4, 10), 1), ((2, 3, 12), 6), ((5, 40), 39)])
def test_matches_sort_reference(device, shape, k):
    s = torch.randn(shape, dtype=torch.float64, device=device)
    torch.testing.assert_close(dftopk_logits(s, k, 0.3), ref_logits(s, k, 0.3))
    torch.testing.assert_close(dftopk(s, k, 0.3), torch.sigmoid(ref_logits(s, k, 0.3)))


@pytest.mark.parametrize("probs", [True, False])
@pytest.mark.parametrize("composed_max", [None, 0])  # None: as shipped (small input: composed); 0: custom backward
def test_gradcheck(probs, composed_max, monkeypatch):
    if composed_max is not None:
        monkeypatch.setattr(DFT, "_COMPOSED_MAX", composed_max)
    fn = dftopk if probs else dftopk_logits
    s = distinct(2, 2, 7).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fn(x, 4, 0.7), (s,))
    mask = torch.rand(2, 2, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    k = torch.tensor([[1, 2], [4, 1]])
    assert torch.autograd.gradcheck(lambda x: fn(x, k, 0.7, mask=mask), (s,))
    assert torch.autograd.gradcheck(lambda x: fn(x, 9, 0.7, mask=mask), (s,))  # every row saturated


def test_gradient_matches_autograd_through_sort():
    s = distinct(6, 15).requires_grad_()
    w = torch.randn(6, 15, dtype=torch.float64)
    y = (torch.rand(6, 15) < 0.5).double()
    mask = torch.rand(6, 15) > 0.2
    for m in (None, mask):
        (g1,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(dftopk_logits(s, 5, 2.0, mask=m), y,
                                                                        weight=w.abs()), s)
        (g2,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(ref_logits(s, 5, 2.0, mask=m), y,
                                                                        weight=w.abs()), s)
        torch.testing.assert_close(g1, g2)


def test_theta_gradient_goes_to_the_two_boundary_items():
    s = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    dftopk_logits(s, 2, 1.0).sum().backward()  # dz_i/ds_j = delta_ij - 1/2 [j in {item 2 (4.0), item 4 (3.0)}]
    torch.testing.assert_close(s.grad, torch.tensor([[1.0, 1.0, -1.5, 1.0, -1.5]], dtype=torch.float64))


def test_ties_at_the_boundary():
    s = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    z = dftopk_logits(s, 2, 1.0)  # x_(2) = x_(3) = 2 -> theta = 2
    torch.testing.assert_close(z, s - 2.0)


def test_mask_invalid_items_are_zero_and_do_not_move_theta():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 12, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 12, generator=g) > 0.4
    mask[:, :6] = True
    out = dftopk(s, 3, 0.5, mask=mask)
    assert torch.all(out[~mask] == 0)
    z = dftopk_logits(s, 3, 0.5, mask=mask)
    assert torch.all(z[~mask] == INVALID_LOGIT)
    s2 = s.clone()
    s2[~mask] = 100.0  # huge invalid scores must not change anything
    torch.testing.assert_close(dftopk_logits(s2, 3, 0.5, mask=mask), z)
    for r in range(4):  # equals the unmasked operator on the valid items alone
        torch.testing.assert_close(z[r][mask[r]], dftopk_logits(s[r][mask[r]], 3, 0.5))


def test_bce_on_invalid_items_is_zero_and_finite():
    s = torch.randn(3, 8, dtype=torch.float32, requires_grad=True)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[:, 5:] = False
    z = dftopk_logits(s, 2, 500.0, mask=mask)
    loss = F.binary_cross_entropy_with_logits(z, torch.zeros_like(z), reduction="none")
    assert torch.all(loss[~mask] == 0)
    loss.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.all(s.grad[~mask] == 0)


def test_k_at_least_valid_count_selects_every_valid_item():
    s = torch.tensor([[0.5, -1.0, 2.0, 7.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]],
                     dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [True] * 4, [False] * 4])
    tau = 0.25
    z = dftopk_logits(s, torch.tensor([3, 6, 1]), tau, mask=mask)
    # row 0: 3 valid, k = 3 -> theta = min valid - margin * tau; row 1: k > n; row 2: no valid item
    torch.testing.assert_close(z[0, :3], (s[0, :3] - (-1.0 - SATURATION_MARGIN * tau)) / tau)
    torch.testing.assert_close(z[1], (s[1] - (1.0 - SATURATION_MARGIN * tau)) / tau)
    assert torch.all(z[2] == INVALID_LOGIT) and z[0, 3] == INVALID_LOGIT
    assert torch.all(z[0, :3] >= SATURATION_MARGIN - 1e-9) and torch.all(z[1] >= SATURATION_MARGIN - 1e-9)
    p = dftopk(s, 4, tau, mask=mask)
    assert torch.all(p[mask] > 0.9999) and torch.all(p[~mask] == 0)
    z.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_per_row_k_matches_rowwise_calls():
    s = torch.randn(5, 9, dtype=torch.float64)
    k = torch.tensor([1, 8, 4, 2, 4])
    z = dftopk_logits(s, k, 0.1)
    for r in range(5):
        torch.testing.assert_close(z[r], dftopk_logits(s[r], int(k[r]), 0.1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_dtypes_on_cpu(dtype):
    s32 = torch.randn(6, 50)
    s = s32.to(dtype).requires_grad_()
    for fn in (dftopk, dftopk_logits):
        out = fn(s, 10, 1.0)
        assert out.dtype == dtype and out.shape == s.shape
        ref = ref_logits(s.detach().float(), 10, 1.0)
        ref = torch.sigmoid(ref) if fn is dftopk else ref
        tol = 1e-2 if dtype == torch.float16 else 5e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
        out.float().sum().backward()
        assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()
        s.grad = None


@HSET
@given(n=st.integers(2, 12), data=st.data())
def test_values_in_unit_interval_and_hard_limit(n, data):
    k = data.draw(st.integers(1, n - 1))
    s = distinct(3, n, seed=data.draw(st.integers(0, 10_000)))
    p = dftopk(s, k, 1.0)
    assert torch.all((p > 0) & (p < 1))
    hard = hard_topk_mask(s, k)
    assert torch.equal(dftopk(s, k, 1e-4) > 0.5, hard)  # tau -> 0: the hard top-k mask
    torch.testing.assert_close(dftopk(s, k, 1e-6), hard.double())


@HSET
@given(n=st.integers(2, 12), data=st.data())
def test_monotone_in_own_score(n, data):
    k = data.draw(st.integers(1, n - 1))
    i = data.draw(st.integers(0, n - 1))
    delta = data.draw(st.floats(0.01, 5.0))
    s = distinct(n, seed=data.draw(st.integers(0, 10_000)))
    s2 = s.clone()
    s2[i] += delta
    assert dftopk(s2, k, 0.5)[i] >= dftopk(s, k, 0.5)[i] - 1e-12


@HSET
@given(n=st.integers(2, 12), data=st.data())
def test_permutation_equivariant(n, data):
    k = data.draw(st.integers(1, n - 1))
    s = distinct(2, n, seed=data.draw(st.integers(0, 10_000)))
    perm = torch.tensor(data.draw(st.permutations(range(n))))
    torch.testing.assert_close(dftopk(s[:, perm], k, 0.7), dftopk(s, k, 0.7)[:, perm])


def ref_theta_loop(s: torch.Tensor, k: int, tau: float, mask: torch.Tensor) -> torch.Tensor:
    """theta of one row written from the conventions: sort the valid scores, saturate at k >= count."""
    valid = s[mask]
    if valid.numel() == 0:
        return torch.zeros((), dtype=s.dtype)
    if k >= valid.numel():
        return valid.min() - SATURATION_MARGIN * tau
    srt = torch.sort(valid, descending=True).values
    return (srt[k - 1] + srt[k]) / 2


@pytest.mark.parametrize("b,n", [(3, 7), (40, 200), (130, 130)])  # both sides of the composed-path size
@pytest.mark.parametrize("masked", [False, True])
def test_rows_match_a_loop_over_the_conventions(b, n, masked):
    g = torch.Generator().manual_seed(b + n)
    s = torch.randn(b, n, generator=g, dtype=torch.float64)
    mask = torch.rand(b, n, generator=g) > 0.4 if masked else torch.ones(b, n, dtype=torch.bool)
    if masked:
        mask[0] = False  # a row without valid items
    k = torch.randint(1, n + 3, (b,), generator=g)  # includes k >= valid count
    z = dftopk_logits(s, k, 0.3, mask=mask if masked else None)
    for r in range(b):
        want = (s[r] - ref_theta_loop(s[r], int(k[r]), 0.3, mask[r])) / 0.3
        torch.testing.assert_close(z[r][mask[r]], want[mask[r]])
        assert torch.all(z[r][~mask[r]] == INVALID_LOGIT)
    for kk in (1, n // 2, n - 1):  # one int k for every row
        z = dftopk_logits(s, kk, 0.3, mask=mask if masked else None)
        for r in range(b):
            want = (s[r] - ref_theta_loop(s[r], kk, 0.3, mask[r])) / 0.3
            torch.testing.assert_close(z[r][mask[r]], want[mask[r]])


@pytest.mark.parametrize("shape", [(4, 10), (200, 100)])  # composed path and custom backward
def test_gradient_is_g_over_tau_minus_half_the_row_sum_at_the_two_boundary_items(shape):
    g = torch.Generator().manual_seed(7)
    s = distinct(*shape, seed=7).requires_grad_()
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    k, tau = 3, 0.5
    (grad,) = torch.autograd.grad((dftopk_logits(s, k, tau) * w).sum(), s)
    srt = torch.sort(s.detach(), dim=-1, descending=True).indices
    want = w / tau
    row = want.sum(-1)
    for j in (k - 1, k):
        want[torch.arange(shape[0]), srt[:, j]] -= 0.5 * row
    torch.testing.assert_close(grad, want)


def test_saturated_row_sends_the_theta_gradient_to_its_weakest_valid_item():
    s = torch.tensor([[0.5, -1.0, 2.0, 7.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, False]])
    dftopk_logits(s, 3, 1.0, mask=mask).sum().backward()  # theta = s[1] - margin: d theta / d s[1] = 1
    torch.testing.assert_close(s.grad, torch.tensor([[1.0, 1.0 - 3.0, 1.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(3, 12), (300, 100)])
def test_ties_at_the_boundary_give_that_value_and_a_unit_theta_gradient(shape):
    g = torch.Generator().manual_seed(9)
    s = torch.randint(0, 4, shape, generator=g).double().requires_grad_()  # many ties
    k = shape[1] // 2
    z = dftopk_logits(s, k, 1.0)
    srt = torch.sort(s.detach(), dim=-1, descending=True).values
    torch.testing.assert_close(z, s.detach() - 0.5 * (srt[:, k - 1:k] + srt[:, k:k + 1]))
    z.sum().backward()  # dL/dtheta = -n per row: the items at theta's value take it together
    tied = (s.detach() == srt[:, k - 1:k]) | (s.detach() == srt[:, k:k + 1])
    torch.testing.assert_close((1.0 - s.grad).sum(-1), torch.full((shape[0],), float(shape[1]), dtype=torch.float64))
    assert torch.all(s.grad[~tied] == 1.0)


def test_composed_and_custom_paths_agree(monkeypatch):
    """The small-input composition and the custom Function give the same values and gradients."""
    s = distinct(30, 40, seed=3)
    w = torch.randn(30, 40, dtype=torch.float64)
    out = []
    for composed_max in (1 << 14, 0):
        monkeypatch.setattr(DFT, "_COMPOSED_MAX", composed_max)
        x = s.clone().requires_grad_()
        p = dftopk(x, 11, 0.7)
        inner = type(p.grad_fn.next_functions[0][0]).__name__  # the node under the sigmoid
        assert ("DFTopK" in inner) == (composed_max == 0), inner
        (p * w).sum().backward()
        out.append((p.detach(), x.grad))
    torch.testing.assert_close(out[0], out[1])
