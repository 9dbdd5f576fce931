"""Per-tensor statistics, reduced on the fly (a new statistic is one entry here).

Each function takes a module's output (or the gradient with respect to it),
in its own dtype, and returns 0-d tensors on its device: accumulation is in
float32 through ``dtype=`` (no float32 copy of a bf16 tensor), nothing is
read back to the host during the pass (no synchronisation), and nothing
larger than a scalar is kept, so memory beyond autograd's own is
O(number of rows).  :mod:`.check` gathers the scalars into one buffer per
device at the end.

Non-finite values need no check of their own here: a NaN or Inf anywhere
makes the sum or the norm non-finite, which the end of the pass reads; only
then is the pass repeated with :func:`exact_moments`, which masks them.
"""

from __future__ import annotations

import torch

_LOW = (torch.float16, torch.bfloat16)


def acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for half precision, the tensor's own above
    (decided in Python: no dispatched op)."""
    return torch.float32 if t.dtype in _LOW or not t.is_floating_point() else t.dtype


def forward_moments(y: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """Sum and Euclidean norm (mean = sum / n, second moment = norm^2 / n,
    formed in float64 at the end, where squares cannot overflow): two fused
    reductions."""
    a = acc(y)
    return {"forward_sum": y.sum(dtype=a), "forward_norm": torch.linalg.vector_norm(y, dtype=a),
            "forward_n": float(max(y.numel(), 1))}


def grad_moments(g: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """Norm of a gradient (mean square = norm^2 / n): one reduction."""
    return {"grad_norm": torch.linalg.vector_norm(g, dtype=acc(g)), "grad_n": float(max(g.numel(), 1))}


def exact_moments(t: torch.Tensor, prefix: str) -> dict[str, torch.Tensor | float]:
    """Sum and norm over the finite entries only, in float64, and the
    non-finite share: the slow path, run only when a pass met NaN/Inf (or a
    float32 overflow of the fast norm)."""
    x = t.detach().double()
    finite = torch.isfinite(x)
    xf = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    out: dict[str, torch.Tensor | float] = {f"{prefix}_norm": torch.linalg.vector_norm(xf),
                                            f"{prefix}_n": finite.sum().clamp_min(1).double(),
                                            f"{prefix}_nonfinite": 1.0 - finite.double().mean()}
    if prefix == "forward":
        out["forward_sum"] = xf.sum()
    return out


def saturation(y: torch.Tensor, band: tuple[float, float]) -> dict[str, torch.Tensor | float]:
    """Number of outputs in the saturated band ``|y - c| > t`` (see
    :func:`signalprop.activations.saturation_band`): exact, over every entry
    (one comparison chain and one sum; no subsample that could alias with the
    tensor's layout)."""
    c, t = band
    z = (y if c == 0.0 else y - c).abs()
    if y.is_cuda:  # a comparison and a sum: the fewest kernels
        count = (z > t).sum(dtype=torch.float32)
    else:  # on CPU a float->bool comparison costs 2-3x these in-place steps (1 where |y - c| > t, else 0)
        count = z.sub_(t).relu_().sign_().sum(dtype=torch.float32)
    return {"saturated_count": count, "saturated_n": float(max(y.numel(), 1))}


# A unit that fires on a share p of the inputs looks dead on k examples and
# positions with probability (1 - p)^k: 2^-k for a symmetric unit, but in real
# nets many units fire rarely (ReLU after a convolution of non-negative inputs,
# BatchNorm at its default running statistics in eval mode).  From k = 32 on,
# a unit firing on 10% of inputs looks dead with probability 3.4% (0.9^32), far
# from the 50% share that makes a row "dead"; below that the data cannot tell.
MIN_SAMPLES_PER_UNIT = 32


def dead_units(y: torch.Tensor, feature_dim: int, vector: bool = False) -> dict[str, torch.Tensor | float] | None:
    """Number of units (entries along ``feature_dim``: the last dimension for
    Linear outputs, dimension 1 for convolutions) that are exactly zero for
    every example *and* position, and how many samples each unit had (the
    verdict judges the share only from :data:`MIN_SAMPLES_PER_UNIT` on).
    ``vector``: the per-unit alive flags instead of their count (under
    ``torch.distributed`` a unit is dead only if it is dead on every rank)."""
    if y.dim() == 0 or y.numel() == 0:
        return None
    fd = feature_dim % y.dim()
    units = y.shape[fd]
    others = tuple(d for d in range(y.dim()) if d != fd)
    alive = torch.any(y != 0, dim=others) if others else (y != 0)
    if vector:
        return {"alive": alive, "units": float(units), "dead_samples": float(y.numel() // units)}
    return {"alive_count": alive.sum(dtype=torch.float32), "units": float(units),
            "dead_samples": float(y.numel() // units)}
