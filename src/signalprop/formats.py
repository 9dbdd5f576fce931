"""Low-precision headroom: how many of a tensor's values a cast to float16,
bfloat16, FP8 E4M3 or E5M2 would flush to zero, leave subnormal or overflow,
counted in one pass for all four formats.

Each count is exact for what a cast does (round to nearest, ties to even),
read off the tensor's bit pattern: with the sign bit cleared, the bits of
``|x|`` read as an integer grow with ``|x|``, so every threshold below is one
integer edge, and one ``bucketize`` against the sorted edges plus one
``bincount`` gives every count at once -- where a comparison per threshold
and format would take a dozen passes over the tensor.  For a nonzero value:

* **flushed** to zero: ``|x| <= smallest subnormal / 2`` (the tie rounds to
  zero, whose mantissa is even);
* **underflow** (it lands below the smallest normal, flushed or subnormal,
  losing precision): ``|x| < smallest normal - smallest subnormal / 2``;
* **overflow**: ``|x| >= max + spacing / 2``, the point where rounding leaves
  the largest finite value (float16 65520, bfloat16 2^128 - 2^119, E5M2 61440);
  E4M3's largest value 448 has an even mantissa, so a tie at 464 still
  rounds to it and only ``|x| > 464`` overflows (to NaN, or to 448 under a
  saturating cast as torch's: out of range either way).

Anchors: NVIDIA Transformer Engine's debug statistics (amax, "underflows %"
of the nonzero entries), Graphcore unit-scaling's ``track_scales``.  Shares
are of the nonzero, non-NaN entries (so a ReLU's zeros do not dilute them).
Importable by every part of signalprop; torch is imported when a kernel runs.
"""

from __future__ import annotations

import math
from typing import Any

from .records import FORMATS

# other names people use for the formats (torch's dtypes are read by name: torch.float16 -> "float16")
ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp8_e4m3": "float8_e4m3fn",
           "e4m3": "float8_e4m3fn", "float8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2", "e5m2": "float8_e5m2"}


def resolve(dtype: Any) -> str:
    """The :data:`~signalprop.records.FORMATS` name of ``dtype``: a name
    there, an alias ("fp16", "bf16", "fp8_e4m3", "e5m2", ...) or a torch
    dtype; anything else raises ``ValueError`` listing what is accepted."""
    name = str(dtype).removeprefix("torch.") if not isinstance(dtype, str) else dtype.lower()
    name = ALIASES.get(name, name)
    if name not in FORMATS:
        raise ValueError(f"dtype must be a low-precision format, one of {sorted(FORMATS)} (or "
                         f"{', '.join(sorted(ALIASES))}, or the torch dtype), got {dtype!r}")
    return name


def name_of(dtype: Any) -> str | None:
    """The :data:`~signalprop.records.FORMATS` name of a torch dtype
    (``torch.float16`` -> "float16"); None for float32, float64 and anything
    that is not a low-precision format."""
    name = str(dtype).removeprefix("torch.")
    return name if name in FORMATS else None


def _edges() -> list[tuple[str, float, bool]]:
    """The thresholds in their fixed order: (name, value, inclusive), where a
    count is of the entries with ``|x| <= value`` (inclusive) or ``< value``."""
    out = [("zero", 0.0, True)]
    for name, f in FORMATS.items():
        spacing = 2.0 ** (math.floor(math.log2(f.max)) - f.mantissa_bits)
        even_max = round(f.max / spacing) % 2 == 0  # a tie above the max rounds down to it
        out += [(f"{name}:flushed", f.smallest_subnormal / 2, True),
                (f"{name}:underflow", f.smallest_normal - f.smallest_subnormal / 2, False),
                (f"{name}:overflow", f.max + spacing / 2, even_max)]
    return out + [("not-nan", math.inf, True)]


EDGES = _edges()
# raw values per tensor: the count of entries below each edge, in EDGES order, then the number of entries
N_COUNTS = len(EDGES) + 1
QUANTITIES = ("overflow", "underflow", "flushed")

_INT: dict[Any, Any] = {}  # floating dtype -> (integer dtype of its width, mask that clears the sign bit)
_CACHE: dict[tuple[Any, Any], tuple[Any, Any]] = {}  # (dtype, device) -> (sorted edges, their order)


def _int_view(dtype: Any) -> tuple[Any, int] | None:
    import torch

    if not _INT:
        _INT.update({torch.float16: (torch.int16, 0x7FFF), torch.bfloat16: (torch.int16, 0x7FFF),
                     torch.float32: (torch.int32, 0x7FFFFFFF), torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF)})
    return _INT.get(dtype)


def _edge_bits(dtype: Any, device: Any) -> tuple[Any, Any]:
    """The edges as integer bit patterns in ``dtype`` (sorted, for
    ``bucketize``) and, per edge in :data:`EDGES` order, its position among
    them.  For values on ``dtype``'s grid, ``|x| < v`` is ``bits < bits(the
    smallest value >= v)`` and ``|x| <= v`` is ``bits < bits(the largest
    value <= v) + 1``."""
    key = (dtype, device)
    got = _CACHE.get(key)
    if got is not None:
        return got
    import torch

    idt, _ = _int_view(dtype)  # type: ignore[misc]
    bits = []
    for _, v, inclusive in EDGES:
        t = torch.tensor(v, dtype=torch.float64).to(dtype)  # nearest (inf past the dtype's range)
        b = int(t.view(idt))
        if inclusive:
            b = (b - 1 if float(t) > v else b) + 1
        elif float(t) < v:
            b += 1
        bits.append(b)
    order = sorted(range(len(bits)), key=bits.__getitem__)
    pos = [0] * len(bits)
    for i, j in enumerate(order):
        pos[j] = i
    # cumulative counts: entry i of the cumsum of the histogram counts the values below sorted edge i
    got = (torch.tensor(sorted(bits), dtype=idt, device=device),
           torch.tensor([*pos, len(bits)], dtype=torch.long, device=device))
    _CACHE[key] = got
    return got


def counts(t: Any, dim: int | None = None) -> Any:
    """The :data:`N_COUNTS` counts of ``t`` (entries below each edge of
    :data:`EDGES`, then all entries), as one tensor on its device: over every
    entry (``dim=None``) or per row of a 2-D batch (``dim=1``: one row of
    counts per row).  No host synchronisation (on a GPU the histogram is an
    ``index_add_``, where ``bincount`` reads its size back).  None for a dtype
    without an integer view (float8, complex)."""
    import torch

    iv = _int_view(t.dtype)
    if iv is None:
        return None
    idt, mask = iv
    edges, order = _edge_bits(t.dtype, t.device)
    # contiguous: a channels_last batch's bits in logical order (bucketize copies, and warns, otherwise)
    idx = torch.bucketize(t.view(idt).bitwise_and(mask).contiguous(), edges, right=True)
    nb = edges.numel() + 1
    rows = 1 if dim is None else t.shape[0]
    if dim is not None:
        idx = idx + torch.arange(0, rows * nb, nb, device=t.device).unsqueeze(1)
    idx = idx.reshape(-1)
    if t.is_cuda:
        h = torch.zeros(rows * nb, dtype=torch.long, device=t.device).index_add_(
            0, idx, torch.ones((), dtype=torch.long, device=t.device).expand(idx.numel()))
    else:
        h = torch.bincount(idx, minlength=rows * nb)
    c = h.view(rows, nb).cumsum(1).index_select(1, order)
    return c[0] if dim is None else c


def kernel(prefix: str) -> Any:
    """A statistic's kernel: :func:`counts` as raw values ``<prefix>_lp<i>``."""

    def k(t: Any, dim: int | None) -> dict[str, Any]:
        c = counts(t, dim)
        return {} if c is None else dict(zip(keys(prefix), c.unbind(-1)))

    return k


def keys(prefix: str) -> list[str]:
    return [f"{prefix}_lp{i}" for i in range(N_COUNTS)]


def shares(prefix: str) -> Any:
    """A statistic's ``finish``: per format, the shares of the nonzero,
    non-NaN entries that would overflow, underflow (land below the smallest
    normal) and be flushed to zero (``flushed`` is part of ``underflow``)."""
    names = keys(prefix)
    at = {name: i for i, (name, _, _) in enumerate(EDGES)}

    def finish(d: dict[str, Any]) -> dict[str, dict[str, float]]:
        c = [float(d[n]) for n in names]
        zeros, not_nan = c[at["zero"]], c[at["not-nan"]]
        base = not_nan - zeros
        out = {}
        for fmt in FORMATS:
            if base <= 0:
                out[fmt] = dict.fromkeys(QUANTITIES, 0.0)
                continue
            out[fmt] = {"overflow": (not_nan - c[at[f"{fmt}:overflow"]]) / base,
                        "underflow": (c[at[f"{fmt}:underflow"]] - zeros) / base,
                        "flushed": (c[at[f"{fmt}:flushed"]] - zeros) / base}
        return out

    return finish


__all__ = ["ALIASES", "EDGES", "N_COUNTS", "QUANTITIES", "counts", "kernel", "keys", "resolve", "shares"]
