"""Attention logits and entropies, measured where attention is computed.

Three places compute attention in PyTorch models: ``F.scaled_dot_product_attention``
(nanoGPT, HF's "sdpa" implementation), which never materialises the logits,
an explicit ``softmax(q k^T / sqrt(d) + mask)`` (HF's "eager"
implementation), and ``nn.MultiheadAttention``, which does either inside one
fused call (SDPA with ``need_weights=False``, a softmax over 3-D
``(batch * heads, queries, keys)`` scores otherwise).  For a softmax over the
last dimension of a 4-D ``(batch, heads, queries, keys)`` tensor the logits
are its input; for SDPA they are formed here from q and k, and for
``nn.MultiheadAttention`` from its inputs and its own query/key projections
(:func:`from_mha`, the same in both ``need_weights`` modes; its inner SDPA
call is not measured again), on at most :data:`QUERY_ROWS` query rows
(evenly spaced, the same on every call), with the call's causal or explicit
masks, in float32.

Per call (raw values of the statistics declared in :mod:`signalprop.statistics`):

* ``attn_logit_max``: the largest |logit| over unmasked entries.  Softmax
  turns a logit gap of 30 into a weight ratio of e^30 ~ 1e13: past that the
  attention is one-hot and its gradient vanishes; Wortsman et al. 2023
  ("Small-scale proxies for large-scale Transformer training instabilities")
  show the maximum logit growing without bound in the runs that diverge.
* ``attn_entropy``: the entropy of each query's attention distribution
  divided by its largest possible value, log(number of keys it may attend to)
  -- 1 for uniform attention, 0 for one-hot -- averaged over queries with at
  least two keys, then over heads; ``attn_entropy_min_head`` the smallest
  head's average.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

QUERY_ROWS = 64  # query rows whose logits are formed for an SDPA call: O(rows x keys) work per head

_FUNCTIONS: dict[Any, str] = {}


def functions() -> dict[Any, str]:
    """The torch callables that compute attention weights -> "sdpa" / "softmax"."""
    if not _FUNCTIONS:
        _FUNCTIONS.update({F.scaled_dot_product_attention: "sdpa", F.softmax: "softmax", torch.softmax: "softmax",
                           torch.Tensor.softmax: "softmax"})
    return _FUNCTIONS


# names whose presence in a forward's code means it may compute attention (HF's attention-function registry
# is looked up by name at run time)
CODE_NAMES = frozenset({"scaled_dot_product_attention", "softmax", "ALL_ATTENTION_FUNCTIONS"})


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, key: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(key, default)


def _stats(logits: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """The raw values from logits ``(..., heads, queries, keys)`` and the mask of
    entries a query may attend to (broadcastable)."""
    x = torch.where(keep, logits, torch.tensor(-math.inf, dtype=logits.dtype, device=logits.device))
    heads = x.shape[-3]
    top = torch.where(keep, logits.abs(), torch.zeros((), dtype=logits.dtype, device=logits.device)).amax()
    p = torch.softmax(x, dim=-1).nan_to_num_(0.0)  # a query with no key at all: no distribution
    ent = -torch.special.xlogy(p, p).sum(-1)  # (..., heads, queries)
    n_keys = keep.expand_as(x).sum(-1).to(logits.dtype)
    norm = torch.log(n_keys.clamp_min(2.0))
    valid = (n_keys >= 2).to(logits.dtype)
    per_head = ((ent / norm) * valid).reshape(-1, heads, ent.shape[-1]).sum((0, 2)) \
        / valid.expand_as(ent).reshape(-1, heads, ent.shape[-1]).sum((0, 2)).clamp_min(1.0)
    return {"attn_logit_max": top, "attn_entropy": per_head.mean(), "attn_entropy_min_head": per_head.min()}


def from_softmax(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, torch.Tensor | float] | None:
    """A softmax over the keys of a 4-D score tensor: its input is the logits."""
    x = args[0] if args else kwargs.get("input")
    dim = _arg(args, kwargs, 1, "dim", None)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point() or dim not in (-1, 3):
        return None
    x = x.detach().float()
    # additive masks use the dtype's lowest value (HF) or -inf: an entry below half of it is masked
    floor = torch.finfo(args[0].dtype if args else kwargs["input"].dtype).min / 2
    return _stats(x, x > floor)


def from_sdpa(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, torch.Tensor | float] | None:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``:
    the logits of :data:`QUERY_ROWS` query rows, formed from q and k."""
    if _arg(args, kwargs, 3, "attn_mask", None) is None:
        return _unmasked_sdpa(args, kwargs)
    got = sdpa_logits(args, kwargs)
    return None if got is None else _stats(*got)


_LAYOUT_CACHED = 1 << 18  # causal masks of at most this many entries (256 KB) are kept, 16 shapes at most


def _query_layout(tq: int, tk: int, causal: bool, device: torch.device,
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, int]:
    """:func:`_layout`, kept for shapes whose mask is small (a long context's
    would hold up to 64 x keys entries on its device for the process's life)."""
    small = not causal or min(tq, QUERY_ROWS) * tk <= _LAYOUT_CACHED
    return _cached_layout(tq, tk, causal, device) if small else _layout(tq, tk, causal, device)


def _layout(tq: int, tk: int, causal: bool, device: torch.device,
            ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, int]:
    """For an SDPA call without ``attn_mask``: the query rows read (None: all
    of them), the entries the causal mask drops (None: no mask), each row's
    weight 1 / log(keys it sees) (0 for a row with fewer than two keys; None
    when every row sees all ``tk``) and how many rows have two keys or more.
    Kept per shape where small (:func:`_query_layout`): a two-layer model at 8 tokens spent more on making
    them than on the logits."""
    n = min(tq, QUERY_ROWS)
    rows = torch.linspace(0, tq - 1, n, device=device).round().long().unique() if n < tq else None
    if not causal:
        return rows, None, None, (rows.numel() if rows is not None else tq) if tk >= 2 else 0
    at = rows if rows is not None else torch.arange(tq, device=device)
    drop = at[:, None] < torch.arange(tk, device=device)[None, :]  # torch's causal mask: query i sees keys 0..i
    keys = (at + 1).clamp(max=tk).double()
    weight = torch.where(keys >= 2, 1.0 / keys.clamp_min(2.0).log(), 0.0).float()  # the logits' dtype
    return rows, drop, weight, int((keys >= 2).sum())


_cached_layout = functools.lru_cache(maxsize=16)(_layout)


def _unmasked_sdpa(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, torch.Tensor | float] | None:
    """:func:`_stats` of an SDPA call without ``attn_mask`` (causal or not),
    in a third of its ops: the rows, the causal mask and each row's number of
    keys are known from the shapes (:func:`_query_layout`), so no row can be
    without a key and nothing is masked out of the entropy's sums."""
    q, k = _arg(args, kwargs, 0, "query", None), _arg(args, kwargs, 1, "key", None)
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or q.dim() < 3 or q.dim() != k.dim():
        return None
    causal = bool(_arg(args, kwargs, 5, "is_causal", False))
    scale = _arg(args, kwargs, 6, "scale", None)
    if q.dim() == 3:
        q, k = q.unsqueeze(0), k.unsqueeze(0)
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if not (tq and tk and q.numel()):  # no query or no key: no logit
        return None
    rows, drop, weight, valid = _query_layout(tq, tk, causal, q.device)
    qs = q.detach() if rows is None else q.detach().index_select(-2, rows)
    kf = k.detach().float()
    if kf.shape[-3] != qs.shape[-3]:  # grouped-query attention
        kf = kf.repeat_interleave(qs.shape[-3] // kf.shape[-3], dim=-3)
    logits = (qs.float() @ kf.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(d))
    heads, nq = logits.shape[-3], logits.shape[-2]
    groups = logits.numel() // (heads * nq * tk)  # batch entries (and any leading dimensions)
    if drop is None or weight is None:
        top = logits.abs().amax()
        # a row with an infinite logit has no distribution (NaN): 0, as in _stats
        ent = torch.special.entr(torch.softmax(logits, dim=-1).nan_to_num_(0.0)).sum(-1)  # (..., heads, queries)
        per_head = ent.reshape(-1, heads, nq).sum((0, 2)) * (1.0 / (math.log(tk) * groups * valid) if valid else 0.0)
    else:
        top = logits.abs().masked_fill_(drop, 0.0).amax()
        p = torch.softmax(logits.masked_fill(drop, -math.inf), dim=-1).nan_to_num_(0.0)  # as in _stats
        ent = torch.special.entr(p).sum(-1) * weight
        per_head = ent.reshape(-1, heads, nq).sum((0, 2)) * (1.0 / (groups * valid) if valid else 0.0)
    return {"attn_logit_max": top, "attn_entropy": per_head.mean(), "attn_entropy_min_head": per_head.min()}


def sdpa_logits(args: tuple[Any, ...], kwargs: dict[str, Any],
                query_rows: int | None = QUERY_ROWS) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The logits q.k^T * scale of an SDPA call (the call's ``scale``, default
    1/sqrt(d); an additive mask added) at ``query_rows`` evenly spaced query
    rows (None: all), and the boolean mask of the entries the softmax keeps
    (causal, boolean or additive ``attn_mask``; broadcastable)."""
    q, k = _arg(args, kwargs, 0, "query", None), _arg(args, kwargs, 1, "key", None)
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or q.dim() < 3 or q.dim() != k.dim():
        return None
    mask = _arg(args, kwargs, 3, "attn_mask", None)
    causal = bool(_arg(args, kwargs, 5, "is_causal", False))
    scale = _arg(args, kwargs, 6, "scale", None)
    if q.dim() == 3:  # (heads, queries, d) without a batch dimension
        q, k = q.unsqueeze(0), k.unsqueeze(0)
        mask = mask.unsqueeze(0) if isinstance(mask, torch.Tensor) and mask.dim() == 3 else mask
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    n_rows = tq if query_rows is None else min(tq, query_rows)
    rows = torch.linspace(0, tq - 1, n_rows, device=q.device).round().long().unique()
    qs = q.detach().index_select(-2, rows).float()
    kf = k.detach().float()
    if kf.shape[-3] != qs.shape[-3]:  # grouped-query attention: each key head serves several query heads
        kf = kf.repeat_interleave(qs.shape[-3] // kf.shape[-3], dim=-3)
    logits = (qs @ kf.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(d))
    keep = torch.ones((), dtype=torch.bool, device=q.device)
    if causal:  # torch aligns the causal mask top-left: query i sees keys 0..i
        keep = rows[:, None] >= torch.arange(tk, device=q.device)[None, :]
    if isinstance(mask, torch.Tensor):
        m = mask.detach().index_select(-2, rows) if mask.dim() >= 2 and mask.shape[-2] == tq else mask.detach()
        if m.dtype == torch.bool:
            keep = keep & m
        else:
            logits = logits + m.float()
            keep = keep & (m.float() > torch.finfo(torch.float32).min / 2)
    return logits, keep


def _mha_masks(m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], n: int, rows: torch.Tensor, tq: int,
               tk: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.MultiheadAttention``'s ``attn_mask`` ((L, S) or (N * heads, L, S))
    and ``key_padding_mask`` ((N, S)) applied to ``logits`` (N, heads, rows,
    S): boolean masks say True where attention is *not* allowed, float masks
    are added; ``is_causal`` without a mask is the causal mask."""
    keep = torch.ones((), dtype=torch.bool, device=logits.device)
    am = _arg(args, kwargs, 5, "attn_mask", None)
    kpm = _arg(args, kwargs, 3, "key_padding_mask", None)
    if am is None and bool(_arg(args, kwargs, 7, "is_causal", False)):
        keep = rows[:, None] >= torch.arange(tk, device=logits.device)[None, :]
    extra = logits.shape[-1] - tk  # keys the module appends (bias_k, add_zero_attn): never masked
    for mask, shape in ((am, None), (kpm, (n, 1, 1, tk))):
        if not isinstance(mask, torch.Tensor):
            continue
        mk = mask.detach()
        if shape is None:
            mk = mk.index_select(-2, rows)
            mk = mk.reshape(n, -1, rows.numel(), tk) if mk.dim() == 3 else mk
        else:
            mk = mk.reshape(shape)
        if extra:
            mk = F.pad(mk, (0, extra), value=False if mk.dtype == torch.bool else 0.0)
        if mk.dtype == torch.bool:
            keep = keep & ~mk
        else:
            logits = logits + mk.float()
            keep = keep & (mk.float() > torch.finfo(torch.float32).min / 2)
    return logits, keep


def from_mha(m: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             query_rows: int | None = QUERY_ROWS) -> dict[str, torch.Tensor | float] | None:
    """The logits of one ``nn.MultiheadAttention`` call, formed from its query
    and key inputs and its own projections (``in_proj_weight`` or
    ``q_proj_weight``/``k_proj_weight``, their biases, ``bias_k``,
    ``add_zero_attn``) at ``query_rows`` evenly spaced query positions, with
    its masks: what its softmax sees, whether or not it returns the weights."""
    query, key = _arg(args, kwargs, 0, "query", None), _arg(args, kwargs, 1, "key", None)
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor)) or query.dim() not in (2, 3) \
            or query.numel() == 0 or key.numel() == 0:  # (an empty batch: no logit to read)
        return None
    if query.dim() == 2:  # unbatched (L, E)
        query, key = query.unsqueeze(1), key.unsqueeze(1)
    elif m.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    E, H = m.embed_dim, m.num_heads
    hd = E // H
    if m._qkv_same_embed_dim:
        wq, wk = m.in_proj_weight[:E], m.in_proj_weight[E:2 * E]
    else:
        wq, wk = m.q_proj_weight, m.k_proj_weight
    bq, bk = (m.in_proj_bias[:E], m.in_proj_bias[E:2 * E]) if m.in_proj_bias is not None else (None, None)
    tq, n, tk = query.shape[0], query.shape[1], key.shape[0]
    r = tq if query_rows is None else min(tq, query_rows)
    rows = torch.linspace(0, tq - 1, r, device=query.device).round().long().unique()
    f = torch.float32
    q = F.linear(query.detach().index_select(0, rows).to(f), wq.detach().to(f), None if bq is None else bq.detach().to(f))
    k = F.linear(key.detach().to(f), wk.detach().to(f), None if bk is None else bk.detach().to(f))
    if m.bias_k is not None:
        k = torch.cat([k, m.bias_k.detach().to(f).expand(1, n, E)])
    if m.add_zero_attn:
        k = torch.cat([k, k.new_zeros(1, n, E)])
    q = q.reshape(-1, n, H, hd).permute(1, 2, 0, 3)  # (N, H, rows, hd)
    k = k.reshape(-1, n, H, hd).permute(1, 2, 3, 0)  # (N, H, hd, S)
    logits, keep = _mha_masks(m, args, kwargs, n, rows, tq, tk, (q @ k) / math.sqrt(hd))
    return _stats(logits, keep)


def module_of(name: str, kind: str) -> str:
    """The module an attention row belongs to: a functional call's row is
    ``<module>.attention`` (kind ``F.scaled_dot_product_attention`` or
    ``F.softmax``); an ``nn.MultiheadAttention`` row is the module itself."""
    return (name.rpartition(".")[0] or name) if kind.startswith("F.") else name


def measure(kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, torch.Tensor | float] | None:
    with torch.no_grad():
        return from_sdpa(args, kwargs) if kind == "sdpa" else from_softmax(args, kwargs)


def logits_of(out: Any) -> torch.Tensor | None:
    """The output's logits: a ``logits`` field (HF ``ModelOutput``), else its
    first floating tensor that is not a 0-d loss (:func:`~.recorder.model_output`),
    when that has a class dimension (2-D or more, the last of size >= 2) and
    entries (not an empty batch)."""
    from .recorder import model_output

    y = model_output(out)
    # (an empty batch has no logits to read)
    return y if y is not None and y.dim() >= 2 and y.shape[-1] >= 2 and y.is_floating_point() and y.numel() \
        else None


def output_logit_sums(y: torch.Tensor) -> list[torch.Tensor | float]:
    """Raw sums over the output logits, left on the device: sum of squares,
    number of entries, max |logit|, sum of each position's log-partition
    log sum_j exp(z_j), number of positions (combined across ranks as
    SUM, SUM, MAX, SUM, SUM)."""
    with torch.no_grad():
        z = y.detach().float()
        lse = torch.logsumexp(z.reshape(-1, z.shape[-1]), dim=-1)
        return [torch.dot(z.reshape(-1), z.reshape(-1)), float(z.numel()), z.abs().amax(), lse.sum(),
                float(lse.numel())]
