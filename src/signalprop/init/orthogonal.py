"""Orthogonal (Saxe et al. 2014) and delta-orthogonal (Xiao et al. 2018) weights."""

from __future__ import annotations

import torch

from ._checks import check_tensor


def _orthogonal_fill(t: torch.Tensor, gain: float, generator: torch.Generator | None) -> None:
    """t <- gain * Q, Q of t's flattened shape (rows, cols) with orthonormal rows
    (rows <= cols) or columns (rows > cols), Haar-distributed.

    QR of a Gaussian matrix with the signs of R's diagonal moved into Q
    (Mezzadri 2007) -- without that correction Q is not Haar.  The Gaussian
    is drawn as torch draws it, (rows, cols) and transposed when wide, so
    float32/float64 values equal :func:`torch.nn.init.orthogonal_`'s for the
    same seed; half precision (which torch's QR refuses) is drawn and
    factored in float32 and rounded once.
    """
    rows = t.shape[0]
    cols = t.numel() // rows
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    a = torch.empty(rows, cols, dtype=dtype, device=t.device).normal_(0.0, 1.0, generator=generator)
    q, r = torch.linalg.qr(a.T if rows < cols else a)
    q.mul_(torch.sgn(torch.diagonal(r)))
    if rows < cols:
        q = q.T
    t.copy_(q.mul_(gain).reshape(t.shape))


def orthogonal_(tensor: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``tensor`` with a scaled (semi-)orthogonal matrix, Saxe et al. (2014).

    ``tensor`` is flattened to ``(shape[0], prod(shape[1:]))``.  Wide or square
    (rows <= cols): W W^T = gain^2 I; tall: W^T W = gain^2 I.  Same
    distribution as :func:`torch.nn.init.orthogonal_`.
    """
    if tensor.dim() < 2:
        raise ValueError(f"orthogonal_ needs a tensor with at least 2 dimensions, got shape {tuple(tensor.shape)}")
    if not check_tensor(tensor, "orthogonal_"):
        return tensor
    with torch.no_grad():
        _orthogonal_fill(tensor, float(gain), generator)
    return tensor


def delta_orthogonal_(tensor: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Delta-orthogonal convolution kernel, Xiao et al. (2018), Algorithm 1.

    For a ``Conv1d/2d/3d`` weight ``(out, in, *k)``: all taps zero except the
    centre one (index ``(k - 1) // 2`` along each spatial axis), which is
    ``gain * Q`` with Q an ``out x in`` matrix of orthonormal columns.  The
    convolution then acts as an orthogonal map at every position, so
    ``||conv(x)|| = gain * ||x||`` away from borders.  Needs out >= in (a map
    to fewer channels cannot be norm-preserving).
    """
    if tensor.dim() not in (3, 4, 5):
        raise ValueError(
            f"delta_orthogonal_ needs a Conv1d/2d/3d weight (3 to 5 dims), got shape {tuple(tensor.shape)}"
        )
    out_ch, in_ch = tensor.shape[0], tensor.shape[1]
    if in_ch > out_ch:
        raise ValueError(
            f"delta_orthogonal_ needs out_channels >= in_channels, got {out_ch} < {in_ch}: "
            "an orthogonal centre tap cannot map more channels to fewer without losing signal; "
            "use orthogonal_ or variance_scaling_ for this layer"
        )
    if not check_tensor(tensor, "delta_orthogonal_"):
        return tensor
    centre = tuple((k - 1) // 2 for k in tensor.shape[2:])
    with torch.no_grad():
        tensor.zero_()
        tap = torch.empty(out_ch, in_ch, dtype=tensor.dtype, device=tensor.device)
        _orthogonal_fill(tap, float(gain), generator)
        tensor[(slice(None), slice(None)) + centre] = tap
    return tensor


__all__ = ["delta_orthogonal_", "orthogonal_"]
