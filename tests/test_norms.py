"""Norms still on the device (signalprop.probe.norms) against
``torch.linalg.vector_norm`` in float64 (the oracle), over the tensors each
path takes: large float32/float64 CPU tensors (BLAS dots, taken in cache
for the copies and differences), mid-sized ones (``_foreach_norm``), small
ones (stacked), non-contiguous and half-precision ones (fused)."""

import pytest
import torch

from signalprop.probe.norms import norms
from signalprop.probe.stats import Part


def _tensors():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(512, 256, generator=g)  # 131,072 entries: a dot, in cache for copies/differences
    return [big, torch.randn(300, 300, generator=g, dtype=torch.float64),  # 90,000: a float64 dot
            torch.randn(64, 64, generator=g),  # 4,096: _foreach_norm
            torch.randn(32, generator=g), torch.randn(32, generator=g),  # small: stacked together
            torch.randn(256, 512, generator=g).t(),  # large, not contiguous: fused
            torch.randn(400, 400, generator=g).bfloat16()]  # half precision: fused


def _value(n):
    return float(n.tensor() if isinstance(n, Part) else n)


def _oracle(t):
    return float(torch.linalg.vector_norm(t.double()))


def _tol(t):
    """float32/float64 accumulation over up to 160,000 entries: well under
    1e-5 (measured ~1e-7; 1e-5 allows any summation order); a bfloat16
    norm is itself a bfloat16, rounded to 8 bits (2^-8)."""
    return 2.0 ** -8 if t.dtype == torch.bfloat16 else 1e-5


def test_norms_equal_the_oracle():
    ts = _tensors()
    for t, n in zip(ts, norms(ts)):
        assert _value(n) == pytest.approx(_oracle(t), rel=_tol(t))


