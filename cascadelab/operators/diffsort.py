"""Differentiable sorting networks (Petersen et al., ICML 2021 / ICLR 2022).

A sorting network is a fixed sequence of layers of disjoint comparators (a, b). A soft comparator
moves the larger value to wire a with probability p = F(steepness * (x_a - x_b)):

    x_a' = p x_a + (1 - p) x_b,     x_b' = (1 - p) x_a + p x_b,

and applies the same mixing to rows a and b of the running permutation estimate P (the identity at
the start). After the last layer wire r holds the r-th largest value and ``P[r, i]`` is the soft
probability that item i ends at descending position r: rows = positions, columns = items, the
orientation of :func:`cascadelab.operators.neural_sort`. Every layer is a doubly-stochastic mixing,
so P is doubly stochastic.

Differences from the DFTopK reference copy (zhangzhen97/DFTOPK ``torch/deep_components/loss/sorting.py``):
the compared values ARE updated after every layer (the reference forgot this, so its network does not
sort), the output is not transposed, and the Gaussian relaxation works.

Implementation: each layer is a precomputed ``partner`` index (the other wire of each wire's
comparator, itself for idle wires) and a sign (+1 winner, -1 loser, 0 idle). One layer costs one
gather + one ``lerp`` on the values (O(n)) and on the rows of P (O(n^2)); no dense n x n matmuls.
Networks:

* ``"odd_even"`` (default, as in the reference): odd-even transposition, n layers, any n.
* ``"bitonic"``: log2(N)(log2(N)+1)/2 layers for N = next power of two >= n. A non-power-of-two n is
  handled as if padded with -inf items and cropped: the padded wires are tracked symbolically while
  the layers are built (a comparator against a pad is a hard no-op or a hard wire relabelling), so the
  pads are never materialised and the n x n result is exactly the crop.

Relaxations F (the ``relaxation`` argument): ``"cauchy"`` (default): 1/2 + atan(v)/pi; ``"logistic"``:
sigmoid(v); ``"gaussian"``: Phi(v); ``"reciprocal"``: (v / (2 + |v|) + 1) / 2.

Memory: autograd keeps two n x n tensors per layer. When that would exceed ~256 MiB the layers run in
sqrt(L)-sized segments under activation checkpointing (recomputed in the backward).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from cascadelab.operators._checks import check_positive, check_scores

NETWORKS = ("odd_even", "bitonic")
RELAXATIONS = ("cauchy", "logistic", "gaussian", "reciprocal")
_CHECKPOINT_BYTES = 256 * 2**20


def diff_sort(scores: Tensor, steepness: float = 10.0, network: str = "odd_even",
              relaxation: str = "cauchy") -> Tensor:
    """Relaxed permutation matrix of a differentiable sorting network, ``(..., n)`` -> ``(..., n, n)``.

    Args:
        scores: ``(..., n)`` floating tensor (higher = better).
        steepness: inverse temperature > 0 of the comparators (reference: 10 for models, 1000 for labels).
        network: ``"odd_even"`` or ``"bitonic"``.
        relaxation: ``"cauchy"``, ``"logistic"``, ``"gaussian"`` or ``"reciprocal"``.

    Returns:
        ``P`` with ``P[..., r, i]`` = probability that item i is at descending position r (row 0 =
        largest); rows and columns sum to 1.

    Raises:
        ValueError: naming the argument, for bad scores, steepness, network or relaxation.
    """
    check_scores(scores, "scores")
    steepness = check_positive(steepness, "steepness")
    if network not in NETWORKS:
        raise ValueError(f"'network' should be one of {NETWORKS} but got {network!r}")
    if relaxation not in RELAXATIONS:
        raise ValueError(f"'relaxation' should be one of {RELAXATIONS} but got {relaxation!r}")
    n = scores.shape[-1]
    partners, signs, final = _network(n, network)
    dev = scores.device
    layers = [(p.to(dev), s.to(device=dev, dtype=scores.dtype)) for p, s in zip(partners, signs, strict=True)]
    x = scores
    perm = torch.eye(n, device=dev, dtype=scores.dtype).expand(*scores.shape, n)
    cdf = _RELAXATION_FNS[relaxation]
    batch = max(1, scores.numel() // n)
    saved = 2 * len(layers) * batch * n * n * scores.element_size()
    if torch.is_grad_enabled() and scores.requires_grad and saved > _CHECKPOINT_BYTES and len(layers) > 1:
        seg = max(1, math.isqrt(len(layers)))
        for lo in range(0, len(layers), seg):
            fn = functools.partial(_apply_layers, layers=layers[lo:lo + seg], steepness=steepness, cdf=cdf)
            x, perm = checkpoint(fn, x, perm, use_reentrant=False)
    else:
        x, perm = _apply_layers(x, perm, layers, steepness, cdf)
    if final is not None:
        perm = perm.index_select(-2, final.to(dev))
    return perm


def _apply_layers(x: Tensor, perm: Tensor, layers, steepness: float, cdf) -> tuple[Tensor, Tensor]:
    for partner, sign in layers:
        xp = x.index_select(-1, partner)
        # q = probability that a wire keeps its own value: F(+-steepness * (x - x_partner))
        q = cdf(steepness * sign * (x - xp))
        x = torch.lerp(xp, x, q)  # q x + (1 - q) x_partner
        perm = torch.lerp(perm.index_select(-2, partner), perm, q.unsqueeze(-1))
    return x, perm


def _cauchy(v: Tensor) -> Tensor:
    return 0.5 + torch.atan(v) / math.pi


def _gaussian(v: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(v / math.sqrt(2.0)))


def _reciprocal(v: Tensor) -> Tensor:
    return 0.5 * (v / (2.0 + v.abs()) + 1.0)


_RELAXATION_FNS = {"cauchy": _cauchy, "logistic": torch.sigmoid, "gaussian": _gaussian,
                   "reciprocal": _reciprocal}


@functools.lru_cache(maxsize=64)
def _network(n: int, network: str) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tensor | None]:
    """Per layer: partner wire (int64, n) and sign (+1 winner / -1 loser / 0 idle); final row order or None.

    The winner of a comparator ends with the larger value, so wire 0 ends with the maximum.
    """
    partners, signs = [], []

    def add_layer(pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        partner = list(range(n))
        sign = [0.0] * n
        for win, lose in pairs:
            partner[win], partner[lose] = lose, win
            sign[win], sign[lose] = 1.0, -1.0
        partners.append(torch.tensor(partner, dtype=torch.long))
        signs.append(torch.tensor(sign, dtype=torch.float64))

    if network == "odd_even":
        for layer in range(n):
            add_layer([(i, i + 1) for i in range(layer % 2, n - 1, 2)])
        return tuple(partners), tuple(signs), None

    # bitonic on N = 2^ceil(log2 n) wires; wires >= n start as -inf pads (slot -1) and are routed symbolically
    size = 1 << max(0, (n - 1).bit_length())
    slot = list(range(n)) + [-1] * (size - n)  # slot[w] = physical item row held by wire w
    block = 2
    while block <= size:
        stride = block // 2
        while stride >= 1:
            pairs = []
            for i in range(size):
                j = i ^ stride
                if j <= i:
                    continue
                win, lose = (i, j) if i & block == 0 else (j, i)  # descending overall
                sw, sl = slot[win], slot[lose]
                if sw >= 0 and sl >= 0:
                    pairs.append((sw, sl))
                elif sw < 0 and sl >= 0:  # a real item always beats a pad: hard relabelling
                    slot[win], slot[lose] = sl, sw
            add_layer(pairs)
            stride //= 2
        block *= 2
    # a soft comparator leaves each item row on its physical slot; wire w (descending position w)
    # reads slot[w] at the end
    final = torch.tensor(slot[:n], dtype=torch.long)
    return tuple(partners), tuple(signs), final
