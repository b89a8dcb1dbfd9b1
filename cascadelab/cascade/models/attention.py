"""DIN's target-attention logits, computed in cache-sized blocks with a backward that recomputes.

For request ``b``, candidate ``n`` and behaviour position ``l``, with the first attention layer already
split into a per-position part ``s = W_seq seq + b1`` and a per-candidate part ``t = W_tgt target``:

    a[b, n, l] = m[b, l] * sum_h w[h] * relu(s[b, l, h] + t[b, n, h])

(``m`` the behaviour mask; the output layer's bias is added by the caller). Written as broadcasts, the
pre-activation ``[B, n, L, H]`` is the largest tensor of the model and autograd keeps it, its relu and
their gradients in memory. Here it only ever exists one block at a time: a block is a run of consecutive
requests and the span of positions holding their behaviour (padded positions outside the span are never
computed), sized to stay in cache. The backward recomputes the block instead of saving it. With
``g = m * dL/da`` and ``M = [s + t > 0]``:

    A[b, l, h] = sum_n g[b, n, l] M[b, n, l, h]        C[b, n, h] = sum_l g[b, n, l] M[b, n, l, h]
    ds = w * A        dt = w * C        dw = sum_{b,l} s * A + sum_{b,n} t * C

the last because ``relu(x) = x [x > 0]``; so a block costs one add, one mask and two reductions.
Off the CPU the same function is evaluated as plain broadcasts (the device has the memory for them, and
``torch.compile`` fuses them); on the CPU the blocked form stays outside compiled graphs.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

BLOCK_ELEMENTS = 1 << 17  # elements of one [rows, n, span, H] block: 512 KiB in float32


def _row_spans(mask: Tensor) -> tuple[list[int], list[int]]:
    """``mask: [B, L]`` bool -> per row, the first valid position and one past the last (``L, 0`` if none)."""
    length = mask.shape[1]
    any_valid = mask.any(1)
    first = torch.where(any_valid, mask.int().argmax(1), length)
    end = torch.where(any_valid, length - mask.flip(1).int().argmax(1), 0)
    return first.tolist(), end.tolist()


def _blocks(first: list[int], end: list[int], row_elements: int, budget: int) -> list[tuple[int, int, int, int]]:
    """Consecutive row blocks ``(i, j, lo, hi)``: rows ``i..j-1`` have all valid positions in ``lo..hi-1``,
    and ``(j - i) * (hi - lo) * row_elements <= budget`` (or the block is one row). Empty blocks are dropped."""
    blocks, i, rows = [], 0, len(first)
    while i < rows:
        lo, hi, j = first[i], end[i], i + 1
        while j < rows:
            lo2, hi2 = min(lo, first[j]), max(hi, end[j])
            if (j + 1 - i) * (hi2 - lo2) * row_elements > budget:
                break
            lo, hi, j = lo2, hi2, j + 1
        if hi > lo:
            blocks.append((i, j, lo, hi))
        i = j
    return blocks


class _BlockedTargetAttention(torch.autograd.Function):
    """``(s [B, L, H], t [B, n, H], w [H], mask [B, L]) -> [B, n, L]``; see the module docstring."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, w: Tensor, mask: Tensor, budget: int) -> Tensor:
        n, h = t.shape[1], t.shape[2]
        blocks = _blocks(*_row_spans(mask), n * h, budget)
        out = s.new_zeros(s.shape[0], n, s.shape[1])
        for i, j, lo, hi in blocks:
            pre = s[i:j, lo:hi].unsqueeze(1) + t[i:j].unsqueeze(2)  # [rows, n, span, H]
            out[i:j, :, lo:hi] = (pre.relu_().view(-1, h) @ w).view(j - i, n, hi - lo)
        out.masked_fill_(~mask.unsqueeze(1), 0.0)  # invalid positions inside a block's span
        ctx.blocks = blocks
        ctx.save_for_backward(s, t, w, mask)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        s, t, w, mask = ctx.saved_tensors
        g = grad.masked_fill(~mask.unsqueeze(1), 0.0)  # also drops non-finite gradients at padding
        a, c = torch.zeros_like(s), torch.zeros_like(t)
        for i, j, lo, hi in ctx.blocks:
            pre = s[i:j, lo:hi].unsqueeze(1) + t[i:j].unsqueeze(2)  # [rows, n, span, H]
            gm = torch.ops.aten.threshold_backward(g[i:j, :, lo:hi].unsqueeze(-1), pre, 0)  # g * [pre > 0]
            torch.sum(gm, 1, out=a[i:j, lo:hi])
            torch.sum(gm, 2, out=c[i:j])
        dw = (s * a).sum((0, 1)) + (t * c).sum((0, 1))
        return a * w, c * w, dw, None, None


def _broadcast_logits(s: Tensor, t: Tensor, w: Tensor, mask: Tensor) -> Tensor:
    hidden = torch.relu(s.unsqueeze(1) + t.unsqueeze(2))  # [B, n, L, H]
    return (hidden @ w) * mask.unsqueeze(1)


def target_attention_logits(s: Tensor, t: Tensor, w: Tensor, mask: Tensor,
                            budget: int = BLOCK_ELEMENTS) -> Tensor:
    """``a[b, n, l] = mask[b, l] * sum_h w[h] relu(s[b, l, h] + t[b, n, h])``, ``[B, n, L]``.

    ``s: [B, L, H]`` per-position pre-activations (first-layer bias included), ``t: [B, n, H]`` per-candidate
    ones, ``w: [H]`` the output layer's weights, ``mask: [B, L]`` bool, True = real behaviour. Padded
    positions give 0 and pass no gradient. Differentiable in ``s``, ``t`` and ``w`` (first order).
    """
    if s.dim() != 3 or t.dim() != 3 or s.shape[0] != t.shape[0] or s.shape[2] != t.shape[2]:
        raise ValueError(f"target attention: s [B, L, H] and t [B, n, H] expected, got {tuple(s.shape)} "
                         f"and {tuple(t.shape)}")
    if s.device.type != "cpu":
        return _broadcast_logits(s, t, w, mask)
    if torch.compiler.is_compiling():  # data-dependent blocks (host ints): kept out of compiled graphs
        return torch.compiler.disable(_BlockedTargetAttention.apply)(s, t, w, mask, budget)
    return _BlockedTargetAttention.apply(s, t, w, mask, budget)
