"""FLOPs and bytes of one training sample of a cascade, counted from the layer shapes, and its roofline.

A sample is one request: its user features, a behaviour sequence of ``L = SEQ_LEN`` positions and ``n``
candidates (``SLOTS`` per candidate group of the cascade's data, plus ``data.sample_num`` in-batch
negatives). The count follows the layers the stage models run (``cascadelab.cascade.models``):

* FLOPs: a multiply-add is 2, any other elementwise operation (add, relu, compare, exp) is 1 per element.
  A linear layer on ``r`` rows costs ``2 r i o`` forward and ``4 r i o`` backward (input and weight
  gradients); a reduction is one add per element. DIN's target attention is counted as it is computed:
  4 per ``[n, L, H]`` element forward (add, relu, multiply-add) and 4 backward (the recomputed add, the
  relu mask, two sums). The objective (a few O(n) passes per stage) is left out.
* Bytes (float32, 4 per element; ids 8): every operation reads its inputs and writes its output in the
  forward; its backward reads the output gradient and the saved inputs and writes the input gradients,
  so an operation with ``i`` input and ``o`` output elements moves ``4 (3 i + 2 o)`` bytes. The attention
  block stays in cache: only ``s``, ``t`` and the logits (and their gradients) count. Weights are read
  once per step, not per sample.
* Optimizer (Adam, dense gradients, once per step, divided by the batch): per parameter 4 FLOPs for
  the moments, 6 for the update and 32 bytes (zero-filled gradient; parameter, gradient and both moments
  read; parameter and moments written).

The roofline of a machine with peak ``F`` FLOP/s and memory bandwidth ``W`` bytes/s is
``min(F / flops, W / bytes)`` samples/s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cascadelab.cascade.batch import ITEM_FIELDS, SEQ_FIELDS, TIME_VOCAB, USER_FIELDS
from cascadelab.platform.config import CascadeConfig
from cascadelab.platform.data.schema import GROUPS_THREE_STAGE, GROUPS_TWO_STAGE, SEQ_LEN, SLOTS
from cascadelab.platform.data.synthetic import SyntheticConfig

F32, ID = 4, 8  # bytes per float32 element, per int64 id
ADAM_FLOPS, ADAM_BYTES = 10, 32  # per parameter per step


@dataclass
class Cost:
    """Per-sample forward FLOPs, backward FLOPs, bytes moved and the matrix-product share of the FLOPs;
    weights: parameters (read once a step)."""

    forward: float = 0.0
    backward: float = 0.0
    bytes: float = 0.0
    weights: int = 0
    matmul: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.forward + other.forward, self.backward + other.backward, self.bytes + other.bytes,
                    self.weights + other.weights, self.matmul + other.matmul)


def _op(fwd: float, bwd: float, inputs: float, outputs: float) -> Cost:
    return Cost(fwd, bwd, F32 * (3 * inputs + 2 * outputs))


def linear(rows: int, fan_in: int, fan_out: int, bias: bool = True) -> Cost:
    """``rows`` rows through ``Linear(fan_in, fan_out)``."""
    macs = rows * fan_in * fan_out
    cost = _op(2 * macs + bias * rows * fan_out, 4 * macs + bias * rows * fan_out, rows * fan_in, rows * fan_out)
    cost.weights, cost.matmul = fan_in * fan_out + bias * fan_out, 6 * macs
    return cost


def elementwise(elements: int, fwd_per: int = 1, bwd_per: int = 1) -> Cost:
    """A relu-like operation on ``elements``: ``fwd_per`` / ``bwd_per`` FLOPs per element."""
    return _op(fwd_per * elements, bwd_per * elements, elements, elements)


def mlp_cost(rows: int, sizes: list[int]) -> Cost:
    """``cascadelab.cascade.models.embedding.mlp(sizes)`` on ``rows`` rows (relu between layers)."""
    cost = Cost()
    for i in range(len(sizes) - 1):
        cost += linear(rows, sizes[i], sizes[i + 1])
        if i < len(sizes) - 2:
            cost += elementwise(rows * sizes[i + 1])
    return cost


def lookup(ids: int, dim: int) -> Cost:
    """``ids`` embedding rows of ``dim``: gather forward, scatter-add backward (the table is the optimizer's)."""
    return Cost(0.0, ids * dim, ID * ids + F32 * 5 * ids * dim)  # read row, write out; read grad, r/w row


def target_attention(n: int, length: int, h: int) -> Cost:
    """The blocked target attention (``cascadelab.cascade.models.attention``) plus its softmax read-out."""
    big = n * length * h
    cost = Cost(4 * big, 4 * big + 4 * (n + length) * h, F32 * (3 * (n + length) * h + 2 * n * length))
    cost += elementwise(n * length, 6, 4)  # bias, mask, softmax (max, subtract, exp, sum, divide)
    cost.weights = h + 1  # the output layer
    return cost


def _request_features(n: int, length: int, e: int) -> Cost:
    """User, sequence and candidate lookups of one stage model."""
    return (lookup(len(USER_FIELDS), e) + lookup(length * len(SEQ_FIELDS), e)
            + lookup(n * len(ITEM_FIELDS), e))


def _masked_mean(length: int, d: int) -> Cost:
    return _op(2 * length * d, 2 * length * d, length * d, d)


def stage_cost(model: str, n: int, length: int, emb_dim: int, hidden: int) -> Cost:
    """One stage model on one request with ``n`` candidates and ``length`` behaviour positions."""
    e, d = emb_dim, len(SEQ_FIELDS) * emb_dim
    user, item = len(USER_FIELDS) * e, len(ITEM_FIELDS) * e
    cost = _request_features(n, length, e)
    if model == "dssm":
        cost += _masked_mean(length, d) + mlp_cost(1, [user + d, hidden, 64, 32])
        cost += mlp_cost(n, [item, hidden, 64, 32]) + _op(2 * n * 32, 4 * n * 32, n * 32 + 32, n)
    elif model == "din":
        cost += linear(length, d, 2 * d) + linear(n, d, 2 * d, bias=False)
        cost += target_attention(n, length, 2 * d)
        cost += _op(2 * n * length * d, 4 * n * length * d, n * length + length * d, n * d)  # interest
        cost.matmul += 6 * n * length * d
        cost += linear(1, user, hidden, bias=False) + linear(n, d + item, hidden)  # split first layer
        cost += elementwise(n * hidden) + mlp_cost(n, [hidden, hidden, 32, 1])
    elif model == "mlp":
        cost += _masked_mean(length, d) + linear(1, user + d, hidden, bias=False) + linear(n, item, hidden)
        cost += elementwise(n * hidden) + mlp_cost(n, [hidden, 64, 32, 1])
    else:
        raise ValueError(f"roofline: model '{model}' is unknown; valid: din, dssm, mlp")
    return cost


def table_parameters(vocab: dict[str, int], emb_dim: int) -> int:
    """Embedding parameters of one stage model (user and item tables, ``V + 1`` rows per field)."""
    sizes = [TIME_VOCAB[f] if f in TIME_VOCAB else vocab[f] for f in USER_FIELDS + ITEM_FIELDS]
    return sum(v + 1 for v in sizes) * emb_dim


def candidates(cfg: CascadeConfig) -> int:
    """Training candidates per request: the logged slots of the cascade's groups plus in-batch negatives."""
    groups = GROUPS_THREE_STAGE if len(cfg.stages) >= 3 else GROUPS_TWO_STAGE
    return SLOTS * len(groups) + cfg.data.sample_num


def cascade_cost(cfg: CascadeConfig, vocab: dict[str, int] | None = None,
                 batch_size: int | None = None) -> dict[str, float]:
    """FLOPs and bytes per training sample (forward + backward + optimizer) of ``cfg``'s cascade.

    ``vocab``: the dataset's id vocabulary (default: the synthetic generator's); ``batch_size``: requests
    per step (default ``cfg.data.batch_size``), over which weights and the optimizer are shared. The
    objective contributes one parameter per stage (the uncertainty weights of DFTopK and its relatives).
    ``flops_matmul``: the matrix-product part of the FLOPs (what ``torch.utils.flop_counter`` counts).
    """
    vocab = vocab or SyntheticConfig().vocab
    batch = batch_size or cfg.data.batch_size
    n, e, hidden = candidates(cfg), cfg.model.emb_dim, cfg.model.hidden
    stages = [stage_cost(s.model, n, SEQ_LEN, e, hidden) for s in cfg.stages]
    total = sum(stages, Cost())
    params = total.weights + len(stages) * (table_parameters(vocab, e) + 1)  # + an uncertainty weight each
    optimizer_flops, optimizer_bytes = ADAM_FLOPS * params / batch, (ADAM_BYTES + F32) * params / batch
    flops = total.forward + total.backward + optimizer_flops
    nbytes = total.bytes + optimizer_bytes  # the F32 term: weights read once a step
    out = {"flops_per_sample": flops, "bytes_per_sample": nbytes, "flops_forward": total.forward,
           "flops_backward": total.backward, "flops_optimizer": optimizer_flops,
           "bytes_optimizer": optimizer_bytes, "flops_matmul": total.matmul, "parameters": float(params),
           "intensity": flops / nbytes,
           "candidates": float(n)}
    for i, (stage, cost) in enumerate(zip(cfg.stages, stages, strict=True)):
        out[f"flops_stage{i}_{stage.model}"] = cost.forward + cost.backward
    return out


def roofline_samples_per_s(cost: dict[str, float], peak_flops: float, bandwidth: float) -> float:
    """``min(peak_flops / flops, bandwidth / bytes)`` samples/s for ``cascade_cost``'s dict."""
    return min(peak_flops / cost["flops_per_sample"], bandwidth / cost["bytes_per_sample"])


def measure_peaks(size: int = 1024, copy_mib: int = 256, repeats: int = 5) -> dict[str, float]:
    """This process's peak FLOP/s (float32 matmul) and bandwidth (copy) at the current torch threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    src = torch.empty(copy_mib << 18)  # float32 elements
    dst = torch.empty_like(src)
    best_mm = best_copy = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best_mm = min(best_mm, time.perf_counter() - t)
        t = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - t)
    return {"peak_flops": 2 * size**3 / best_mm, "bandwidth": 2 * src.numel() * F32 / best_copy}
