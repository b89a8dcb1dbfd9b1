"""Input validation shared by the public operator wrappers.

Checks run once, in the public function, before any autograd Function (the torchsort pattern); the
math inside the Functions carries no checks. Every failure raises ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_scores(scores: object, name: str = "scores") -> Tensor:
    """Validate an operator input: a floating tensor with >= 1 dim, >= 1 item and only finite values.

    Returns the scores unchanged. Finiteness is read from one reduction: NaN and inf propagate into the
    sum, so a finite sum proves every value finite. A non-finite sum may also be an overflow of finite
    values (float16 above 65504), so then the two extrema decide: ``aminmax`` propagates NaN and an
    inf is an extremum, so both are finite exactly when every value is.
    """
    _check_tensor_layout(scores, name)
    assert isinstance(scores, Tensor)
    if math.isfinite(scores.detach().sum()):
        return scores
    lo, hi = torch.aminmax(scores.detach())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"'{name}' contains NaN or inf")
    return scores


def _check_tensor_layout(scores: object, name: str) -> None:
    if not isinstance(scores, Tensor):
        raise ValueError(f"'{name}' should be a torch.Tensor but got {type(scores).__name__}")
    if scores.dim() == 0:
        raise ValueError(f"'{name}' should have at least 1 dimension (items on the last) but is a scalar")
    if scores.numel() == 0:
        raise ValueError(f"'{name}' should not be empty but has shape {tuple(scores.shape)}")
    if scores.dtype not in FLOAT_DTYPES:
        raise ValueError(f"'{name}' should be float16/bfloat16/float32/float64 but has dtype {scores.dtype}")


def check_positive(value: object, name: str) -> float:
    """A strictly positive, finite python number (temperatures, steepness, regularisation)."""
    if type(value) is float and 0.0 < value < math.inf:  # the common case, without the general checks
        return value
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"'{name}' should be a positive finite number but got a tensor of shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"'{name}' should be a positive finite number but got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"'{name}' should be a positive finite number but got {value!r}")
    return v


def check_k(k: object, scores: Tensor, name: str = "k", integer: bool = True) -> int | float | Tensor:
    """Validate ``k``: a positive python number, or a tensor of shape ``scores.shape[:-1]`` with all entries > 0.

    With ``integer=True`` (top-k masks) ``k`` must be integral. A tensor ``k`` is returned on
    ``scores.device``: int64 when integral, else float64.
    """
    if type(k) is int and k > 0:  # the common case, without the general checks
        return k
    batch_shape = scores.shape[:-1]
    if isinstance(k, Tensor):
        if k.dim() == 0:
            return check_k(k.item(), scores, name, integer)
        if tuple(k.shape) != tuple(batch_shape):
            raise ValueError(f"'{name}' as a tensor should have shape {tuple(batch_shape)} (the leading dims "
                             f"of scores) but got {tuple(k.shape)}")
        if k.dtype == torch.bool:
            raise ValueError(f"'{name}' should hold integers > 0 but has dtype bool")
        is_int = not (k.is_floating_point() or k.is_complex())
        if integer and not is_int:
            raise ValueError(f"'{name}' should be an integer tensor but has dtype {k.dtype}")
        if k.is_complex():
            raise ValueError(f"'{name}' should be real but has dtype {k.dtype}")
        if not is_int and not bool(torch.isfinite(k).all()):
            raise ValueError(f"'{name}' contains NaN or inf")
        if bool((k <= 0).any()):
            raise ValueError(f"'{name}' should be > 0 in every row but its minimum is {k.min().item()}")
        return k.to(device=scores.device, dtype=torch.int64 if is_int else torch.float64)
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise ValueError(f"'{name}' should be a positive {'int' if integer else 'number'} or a per-row tensor "
                         f"but got {k!r}")
    if integer:
        if not isinstance(k, numbers.Integral):
            raise ValueError(f"'{name}' should be a positive int but got {k!r}")
        k = int(k)
    elif not math.isfinite(float(k)):
        raise ValueError(f"'{name}' should be finite but got {k!r}")
    if k <= 0:
        raise ValueError(f"'{name}' should be > 0 but got {k!r}")
    return k


def check_mask(mask: object, scores: Tensor, name: str = "mask") -> Tensor | None:
    """``None`` or a bool tensor with exactly the shape of ``scores`` (True = valid item)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"'{name}' should be a bool torch.Tensor or None but got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(scores.shape):
        raise ValueError(f"'{name}' should have the shape of scores {tuple(scores.shape)} but got "
                         f"{tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"'{name}' should have dtype torch.bool but has {mask.dtype}")
    return mask.to(scores.device)
