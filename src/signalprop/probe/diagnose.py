"""From measurements to verdicts, reasons and concrete fixes.

How a verdict is decided (the README's "How the verdict is decided" says the
same for users):

* Gradients are judged *relative to the gradient at the model's output*
  (``LayerStats.relative_grad_rms``): a per-element RMS divided by a
  per-element RMS, so batch size, sequence length, a loss's mean reduction
  and the dtype cancel.  Parameter gradients, which sum over the batch, are
  reported but never judged.
* **Exploding**: a row's relative gradient above the upper bound.  A row
  that feeds a normalisation layer is judged by gradient times its signal
  RMS over the norm's output RMS: a normalisation is scale-invariant, so a
  small input gets a proportionally large gradient with the same effect.
* **Vanishing** (bound): a row's relative gradient below the lower bound
  (or exactly zero) *and no row executed before it has one above it*: the
  backward signal never reaches the input side again.  A small gradient
  behind a healthy one upstream is a branch scaled down by design (layer
  scale, zero-initialised residual branches, attention logits), not a long
  product of Jacobians.
* **Vanishing / exploding** (depth trend): rows of one *role* -- the same
  module position in repeated blocks -- are compared with each other only.
  If the gradient changes by more than ``trend`` from the last to the first
  block -- measured as the median step between neighbouring blocks to the
  power of the number of steps, so one odd block is no trend -- it shrinks
  (grows) across blocks; the same for the forward second moment with
  ``trend**2``.  One-off hops between different
  roles (embedding -> first norm, a read-out's width change) never count.
* **Saturated**: over half of a bounded activation's outputs where its slope
  is below 1% of its maximum.  **Dead**: over half of a rectifier's units
  zero for every example and position (judged only with >= 8 samples per
  unit), unless the row is already vanishing (then the signal died first).
* **Non-finite**: NaN/Inf in the input, the forward signal, or the gradient,
  located where it starts.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ..layers import PASS_THROUGH_NAMES, is_norm_kind
from ..records import SEVERITY, InputStats, LayerStats, Problem, SeriesTrend, Verdict, evolve
from ..words import count, module_label, sci, share, span_label, times
from .attention import module_of
from .stats import MIN_SAMPLES_PER_UNIT

SATURATED_SHARE = 0.5  # a layer is "saturated" when over half its units are
DEAD_SHARE = 0.5  # a rectifier layer is "dead" when over half its units never fire
MIN_SERIES = 3  # rows of one role needed before a change across them is a trend


def _g(layer: LayerStats) -> float | None:
    g = layer.relative_grad_rms
    return g if g is not None and not math.isnan(g) else None


_CALL = re.compile(r"@(\d+)$")  # a role's call suffix (see _role_call)


def _role_call(layer: LayerStats) -> tuple[str, int]:
    """The row's role without its call suffix, and which call of its module
    the row is, from 1 (a module called several times in one forward -- a
    cell unrolled over time, a shared block -- has one row per call, the
    k-th's role ending in ``@k-1``)."""
    role = layer.role or ""
    m = _CALL.search(role)
    return (role[:m.start()], int(m.group(1)) + 1) if m else (role, 1)


def _call_of(layer: LayerStats) -> int:
    return _role_call(layer)[1]


def _label(layer: LayerStats) -> str:
    """The row's module as a reader finds it (``Linear #18``, ``encoder.layer.0.attn``; a module's later calls
    with their number: ``cell (call 30)``)."""
    k = _call_of(layer)
    return module_label(layer.name, layer.kind) + (f" (call {k})" if k > 1 else "")


@dataclass
class _Evidence:
    """Why some rows carry a flag: which rule, with the numbers it judged."""

    kind: Verdict
    rule: str  # "bound" | "series" | "forward"
    rows: set[int]
    message: str  # why, in one sentence: the number judged and what it is relative to
    strength: float  # how far past the limit (for choosing what to quote)
    # the why-sentence for some of the rows (a problem's run), where it quotes one row's figure
    say: Callable[[set[int]], str] | None = None

    def why(self, rows: set[int]) -> str:
        return self.say(rows) if self.say is not None else self.message




def _effective(layers: list[LayerStats]) -> tuple[list[float | None], list[int | None]]:
    """Relative gradient RMS, corrected where a row feeds a normalisation layer.

    A normalisation is scale-invariant: an input ``s`` times smaller gets a
    gradient ``s`` times larger, with the same effect on the loss (the
    small-init embedding of RWKV, embeddings brought to a small scale by
    ``critical_`` before an RMSNorm).  What is invariant is gradient times
    signal, so such a row is judged by ``g * rms(row) / rms(norm output)``,
    the next row with a gradient (dropout skipped) being the norm.  Also
    returns, per row, the index of the norm it was judged against (None
    where the plain relative gradient is judged)."""
    out = [_g(layer) for layer in layers]
    via: list[int | None] = [None] * len(layers)
    nxt: LayerStats | None = None
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        g = out[i]
        if g is not None and nxt is not None and is_norm_kind(nxt.kind) and nxt.forward_second_moment > 0:
            out[i] = g * math.sqrt(layer.forward_second_moment / nxt.forward_second_moment)
            via[i] = nxt.index
        if g is not None and layer.kind not in PASS_THROUGH_NAMES:
            nxt = layer
    return out, via


def _zero_fed(layers: list[LayerStats], eff: list[float | None], gated: frozenset[str] = frozenset()) -> set[int]:
    """The rows whose gradient is exactly 0 because they feed a module whose
    parameters are all 0 (LoRA's B, a zero-initialised residual branch or
    output layer), which passes no gradient back until they move -- by
    design, not a vanishing gradient: the run of exact-0 rows (rows without
    a gradient in between) right before such a module, and no further (a
    row with a gradient ends it: an exact 0 before that has another cause).
    Likewise the exact-0 rows inside a module of ``gated``, which scales
    them by an all-zero parameter of its own in its own code (ReZero's
    alpha, a LayerScale started at 0)."""
    out: set[int] = {i for i, (layer, g) in enumerate(zip(layers, eff))
                     if g == 0 and any(layer.name.startswith(block + ".") for block in gated)}
    for i, layer in enumerate(layers):
        # ||grad|| / ||w|| is inf for a finite parameter gradient only where ||w|| is 0
        if not (layer.grad_to_weight is not None and math.isinf(layer.grad_to_weight)
                and layer.param_grad_rms is not None and math.isfinite(layer.param_grad_rms)):
            continue
        j = i - 1
        while j >= 0 and (eff[j] is None or eff[j] == 0):
            if eff[j] == 0:
                out.add(j)
            j -= 1
    return out


def _bound_evidence(layers: list[LayerStats], lo: float, hi: float,
                    gated: frozenset[str] = frozenset()) -> list[_Evidence]:
    out = []
    eff, via = _effective(layers)
    big = {layer.index: g for layer, g in zip(layers, eff) if g is not None and g > hi}

    def too_big(rows: set[int]) -> str:
        """Why, quoting the largest figure among ``rows``."""
        i = max(rows & big.keys() or big.keys(), key=lambda k: big[k])
        v, row, norm = big[i], layers[i], via[i]
        raw = _g(row)
        if norm is not None and raw is not None:
            # the figure is scaled: say so, with the plain one beside it
            return (f"Because {_label(row)} feeds the norm {_label(layers[norm])}, which gives a small input a "
                    f"proportionally large gradient, it is judged scale-free: its gradient's RMS ({raw:.3g} "
                    f"times the RMS at the model's output) times its signal's RMS over the norm output's "
                    f"({math.sqrt(row.forward_second_moment / layers[norm].forward_second_moment):.3g}) is "
                    f"{v:.3g}, above the upper bound {sci(hi)}.")
        return (f"At {_label(row)} the gradient's RMS is {v:.3g} times the RMS at the model's output, above the "
                f"upper bound {sci(hi)}.")

    if big:
        out.append(_Evidence("exploding", "bound", set(big), too_big(set(big)), max(big.values()) / hi, too_big))
    small: dict[int, float] = {}
    best_before = 0.0
    excused = _zero_fed(layers, eff, gated)
    for i, (layer, g) in enumerate(zip(layers, eff)):
        if g is None or i in excused:
            continue
        if g < lo and best_before < lo:
            small[layer.index] = g
        best_before = max(best_before, g)

    def too_small(rows: set[int]) -> str:
        """Why, quoting the smallest figure among ``rows`` (the first such row on a tie)."""
        i = min(rows & small.keys() or small.keys(), key=lambda k: (small[k], k))
        m, row = small[i], layers[i]
        peak = row.grad_absmax
        at = (f"At {_label(row)} the gradient's RMS underflows to 0 (its sum of squares is below the smallest "
              f"float; its largest entry is {peak:.2g}), below the lower bound {sci(lo)} times the RMS at the "
              "model's output" if m == 0 and peak else
              f"At {_label(row)} the gradient is exactly 0 (it underflows, or an operation with a zero derivative "
              f"such as rounding cuts it; the lower bound is {sci(lo)} times the "
              "RMS at the model's output)" if m == 0 else
              f"At {_label(row)} the gradient's RMS is {m:.3g} times the RMS at the model's output, below the lower "
              f"bound {sci(lo)}")
        return f"{at}, and no layer nearer the input recovers it: the backward signal does not reach the input."

    if small:
        m = min(small.values())
        out.append(_Evidence("vanishing", "bound", set(small), too_small(set(small)),
                             lo / m if m > 0 else math.inf, too_small))
    return out


def _extremes(v: list[float]) -> tuple[float, float]:
    """max over i < j of v[j] / v[i] and of v[i] / v[j]."""
    drop = growth = 1.0
    lo_before, hi_before = v[0], v[0]
    for x in v[1:]:
        drop, growth = max(drop, x / lo_before), max(growth, hi_before / x)
        lo_before, hi_before = min(lo_before, x), max(hi_before, x)
    return drop, growth


def _median_trend(v: list[float], pairs: list[tuple[int, int]] | None = None) -> float:
    """First-to-last change of v as the median step ratio to the power of the
    number of steps: exp(median(log v[k] - log v[k+1]) * (n - 1)).  With
    ``pairs`` (see :func:`_block_steps`), each step is read from row k to
    row j, per row: (log v[k] - log v[j]) / (j - k)."""
    n = len(v)
    steps = sorted(math.log(v[a] / v[b]) / (b - a) for a, b in (pairs or zip(range(n - 1), range(1, n))))
    k = len(steps)
    med = steps[k // 2] if k % 2 else 0.5 * (steps[k // 2 - 1] + steps[k // 2])
    return math.exp(min(700.0, max(-700.0, med * (n - 1))))


def _block_steps(rows: list[LayerStats]) -> list[tuple[int, int]] | None:
    """Where each block holds several rows of a series in a chain of its own
    (``blocks.#.mlp = Sequential(Linear, GELU, Linear)``: ``blocks.0.mlp.0``,
    ``blocks.0.mlp.2``, ``blocks.1.mlp.0``, ...; the rows with the same name
    but for its last number are one block's), the steps of the series: from
    each row to the row at its place (the same last number) in the next
    block, as (k, j) pairs; None where no block holds two (a top-level
    ``nn.Sequential`` is one chain: its layers are the repeats).  Neighbours
    inside a block hold different places -- in a pre-LN residual block the
    first Linear reads the normalised stream and the second writes into it,
    ~3x apart -- and that sawtooth, read as steps between neighbours,
    compounded into "vanishing 971x" over 4 healthy blocks.  Blocks may hold
    chains of different lengths; a row whose place the next block lacks
    makes no step."""
    keys, places = [], []
    for layer in rows:
        parts = layer.name.split(".")
        last = max((j for j, c in enumerate(parts) if c.isdigit()), default=None)
        keys.append(".".join(parts[:last] + parts[last + 1:]) if last is not None else layer.name)
        places.append(parts[last] if last is not None else "")
    blocks: list[list[int]] = []  # runs of rows with one key, in order
    for k, key in enumerate(keys):
        if blocks and keys[blocks[-1][0]] == key:
            blocks[-1].append(k)
        else:
            blocks.append([k])
    if len(blocks) < 2 or max(len(b) for b in blocks) < 2:
        return None
    pairs = []
    for here, there in zip(blocks, blocks[1:]):
        at = {places[j]: j for j in there}
        pairs += [(k, at[places[k]]) for k in here if places[k] in at]
    return pairs or None


def _series(layers: list[LayerStats]) -> list[tuple[str, list[LayerStats]]]:
    """Rows of one role (3 or more) whose blocks hold the same computation:
    see :func:`_alike_blocks`."""
    by_role: dict[str, list[LayerStats]] = defaultdict(list)
    for layer in layers:
        g = _g(layer)
        if layer.role and g is not None and 0 < g < math.inf and 0 < layer.forward_second_moment < math.inf:
            by_role[layer.role].append(layer)
    contents: dict[str, set[str]] | None = None
    out = []
    for r, rows in by_role.items():
        if len(rows) < MIN_SERIES:
            continue
        if contents is None and _block_at(r) is not None:
            contents = _block_contents(layers)
        out += [(r, part) for part in (_alike_blocks(r, rows, contents) if contents is not None else [rows])
                if len(part) >= MIN_SERIES]
    return out


def _block_at(role: str) -> int | None:
    """Where in the role's name its repeated block is numbered (the first
    ``#``), when the row sits inside that block rather than being it."""
    parts = role.partition("|")[0].split(".")
    i = parts.index("#") if "#" in parts else None
    return i if i is not None and i < len(parts) - 1 else None


def _block_contents(layers: list[LayerStats]) -> dict[str, set[str]]:
    """Per repeated block (the name up to its number), what its rows are:
    their roles' names inside the block (numbers as ``#``: an expert list's
    rows are one entry however many experts the routing reached) and kinds."""
    out: dict[str, set[str]] = defaultdict(set)
    for layer in layers:
        role = _role_call(layer)[0]
        name, kind, _ = role.split("|", 2) if role.count("|") >= 2 else (role, layer.kind, "")
        parts = name.split(".")
        if "#" not in parts:
            continue
        i = parts.index("#")
        out[".".join(layer.name.split(".")[:i + 1])].add(f"{'.'.join(parts[i + 1:])}|{kind}")
    return out


def _alike_blocks(role: str, rows: list[LayerStats], contents: dict[str, set[str]]) -> list[list[LayerStats]]:
    """``rows`` of one role split by what their blocks compute: a hybrid's
    blocks alternate mixers (Jamba's Mamba and attention layers, each with
    an ``input_layernorm``), and the norm before a Mamba mixer gets a
    gradient ~100x smaller than the one before attention -- a sawtooth whose
    median step, read as a trend, made 4 healthy layers "vanishing
    1,000,000x".  Rows are compared only with rows of blocks holding the same
    rows (by role), or all of another's and more: a block that adds a branch
    (T5's relative position bias in its first block, a ResNet stage's first
    block with its shortcut) computes the same chain, one that swaps a module
    (Mamba for attention, a dense MLP for experts) does not.  One list where
    the role has no block around it."""
    i = _block_at(role)
    if i is None:
        return [rows]
    groups: list[tuple[set[str], list[LayerStats]]] = []
    for layer in rows:
        key = contents.get(".".join(layer.name.split(".")[:i + 1]), set())
        for first, members in groups:  # (compared with the group's first block)
            if key <= first or first <= key:
                members.append(layer)
                break
        else:
            groups.append((key, [layer]))
    return [members for _, members in groups]


def _role_label(role: str) -> str:
    """A repeated module position in words: ``Linear layers`` for the unnamed
    children of a Sequential, ``Linear layers blocks.*.fc1`` otherwise (``*``
    for the block number)."""
    name, kind, _ = role.split("|")
    pattern = name.replace("#", "*")
    return f"{kind} layers" if not name or set(name.split(".")) <= {"#"} else f"{kind} layers {pattern}"


def _series_evidence(series: list[tuple[str, list[LayerStats]]], trend: float) -> tuple[list[_Evidence], list[SeriesTrend]]:
    out: list[_Evidence] = []
    trends = []
    for role, rows in series:
        g = [_g(layer) or 0.0 for layer in rows]
        m = [layer.forward_second_moment for layer in rows]
        drop, growth = _extremes(g)
        trends.append(SeriesTrend(role, tuple(layer.index for layer in rows), rows[0].name, rows[-1].name,
                                  g[0] / g[-1], drop, growth, m[-1] / m[0]))
        label, n = _role_label(role), len(rows)
        a, b = _label(rows[0]), _label(rows[-1])
        # A long product of Jacobians changes the gradient a little at every block; the
        # median step across blocks measures that, and one odd block (the first block of a
        # pre-norm transformer sees the embedding-scale stream) does not move it.
        # (a block index and a place in its chain: two numbered parts of the name at least)
        pairs = _block_steps(rows) if role.partition("|")[0].count("#") >= 2 else None
        up = _median_trend(g, pairs)  # > 1: larger toward the input
        fup = _median_trend(m, pairs)  # > 1: forward signal smaller deeper (m is in execution order)
        rows_all = {layer.index for layer in rows}
        step = "the median step between neighbours" if pairs is None else \
            "the median step per layer, read from each to its place in the next block"
        if up < 1 / trend:
            out.append(_Evidence("vanishing", "series", rows_all,
                                 f"Over the {n} repeated {label} the gradient's RMS shrinks {times(1 / up)} from the "
                                 f"last ({b}) back to the first ({a}) -- {step}, "
                                 f"{(1 / up) ** (1 / (n - 1)):.3g}x, over {n - 1} steps -- more than the "
                                 f"{trend:g}x allowed across depth: a long product of layer Jacobians that shrink it.",
                                 1 / (up * trend)))
        if up > trend:
            out.append(_Evidence("exploding", "series", rows_all,
                                 f"Over the {n} repeated {label} the gradient's RMS grows {times(up)} from the last "
                                 f"({b}) back to the first ({a}) -- {step}, "
                                 f"{up ** (1 / (n - 1)):.3g}x, over {n - 1} steps -- more than the {trend:g}x "
                                 "allowed across depth: a long product of layer Jacobians that enlarge it.",
                                 up / trend))
        t2 = trend * trend
        if fup > t2:
            out.append(_Evidence("vanishing", "forward", rows_all,
                                 f"Over the {n} repeated {label} the forward signal's mean square E[y²] falls "
                                 f"{times(fup)} from {a} to {b}, more than the {t2:g}x (the depth limit squared) "
                                 "allowed.", fup / t2))
        if fup < 1 / t2:
            out.append(_Evidence("exploding", "forward", rows_all,
                                 f"Over the {n} repeated {label} the forward signal's mean square E[y²] grows "
                                 f"{times(1 / fup)} from {a} to {b}, more than the {t2:g}x (the depth limit squared) "
                                 "allowed.", 1 / (fup * t2)))
    return out, trends


def _judge_dead(layers: list[LayerStats], unjudged_from: int | None) -> tuple[list[LayerStats], list[str]]:
    """Keep a dead share only where the data can tell: each unit seen on at
    least MIN_SAMPLES_PER_UNIT examples x positions (a healthy unit is zero
    on about half of them), or every unit zero while the pre-activation sits
    entirely below zero (its mean more than 3 standard deviations under 0:
    dead whatever the batch)."""
    out, unjudged = [], []
    for layer in layers:
        if unjudged_from is not None and layer.index > unjudged_from and layer.dead_fraction is not None:
            out.append(evolve(layer, dead_fraction=None))
            continue
        if layer.dead_fraction is None or (layer.dead_samples or 0) >= MIN_SAMPLES_PER_UNIT:
            out.append(layer)
            continue
        p = _producer(layers, layer.index)
        certain = layer.dead_fraction >= 1.0 and p is not None and \
            p.forward_mean + 3 * math.sqrt(p.forward_var) < 0
        if not certain:
            unjudged.append(layer)
            layer = evolve(layer, dead_fraction=None)
        out.append(layer)
    notes = []
    if unjudged:
        k = min(layer.dead_samples or 0 for layer in unjudged)
        notes.append(f"dead units not judged in {count(len(unjudged), 'rectifier layer')}: {k} example(s) x "
                     f"positions per unit, and a healthy unit is zero on about half of them; {MIN_SAMPLES_PER_UNIT} "
                     "or more are needed to tell dead from alive")
    return out, notes


def _producer(layers: list[LayerStats], i: int) -> LayerStats | None:
    return layers[i - 1] if i > 0 else None


def _share_evidence(layers: list[LayerStats], vanishing: set[int], forward_vanishing: set[int],
                    all_zero: list[int]) -> tuple[list[_Evidence], set[int]]:
    """Saturated and dead rows, and the zero-gradient rows a dead row explains.

    A rectifier row is dead -- the cause, not a symptom -- only where the row
    feeding it still carries a signal (a non-zero second moment, not vanishing
    with depth): a unit fed nothing outputs 0 because the signal vanished
    upstream.  All units dead stop every gradient, so the exactly-zero
    gradients of the rows before such a row are its doing, not a vanishing
    product of Jacobians."""
    out = []
    sat = {layer.index: layer.saturation for layer in layers if (layer.saturation or 0) > SATURATED_SHARE}
    if sat:
        out.append(_Evidence("saturated", "share", set(sat), "", max(v for v in sat.values() if v is not None)))
    attn = {layer.index: layer.attn_logit_max for layer in layers if _attention_saturated(layer)}
    if attn:
        out.append(_Evidence("saturated", "attention", set(attn), "", max(attn.values())))
    dead: dict[int, float] = {}
    for layer in layers:
        p = _producer(layers, layer.index)
        if (layer.dead_fraction or 0) > DEAD_SHARE and p is not None and p.forward_second_moment > 0 \
                and p.index not in forward_vanishing and layer.index not in forward_vanishing:
            dead[layer.index] = layer.dead_fraction  # type: ignore[assignment]
    explained: set[int] = set()
    if any(d >= 1.0 for d in dead.values()):  # a dead cause, maybe followed by rows it starved
        explained = {layer.index for layer in layers[:max(all_zero)] if layer.grad_rms == 0}
    dead = {i: d for i, d in dead.items() if i not in vanishing - explained}
    if dead:
        out.append(_Evidence("dead", "share", set(dead), "", max(dead.values())))
    return out, explained


# Attention is saturated where softmax is one-hot: each query's entropy under 10% of uniform attention's
# over its keys, with logits large enough to explain it (a gap of 30 is a weight ratio of e^30 ~ 1e13).
# A trained model's heads that attend to one token (an attention sink) do so with logits of ~10-20.
ATTN_ENTROPY_SATURATED = 0.1
ATTN_LOGIT_SATURATED = 30.0


def _attention_saturated(layer: LayerStats) -> bool:
    ent, top = layer.stats.get("attn_entropy"), layer.stats.get("attn_logit_max")
    return ent is not None and top is not None and ent < ATTN_ENTROPY_SATURATED and top >= ATTN_LOGIT_SATURATED


def _attention_problem(layer: LayerStats) -> Problem:
    module = module_of(layer.name, layer.kind)
    ent, top = layer.stats["attn_entropy"], layer.stats["attn_logit_max"]
    return Problem(
        module, "saturated",
        f"Attention in {module} is saturated. Its logits (q·k times the attention's scale, as its softmax "
        f"takes them) reach {top:.3g} and each query's attention "
        f"entropy is {ent:.1%} of uniform attention's (the lowest head "
        f"{layer.stats.get('attn_entropy_min_head', ent):.1%}; saturated means under "
        f"{ATTN_ENTROPY_SATURATED:.0%} with logits of {ATTN_LOGIT_SATURATED:g} or more), so the softmax is one-hot "
        "and passes almost no gradient to the queries and keys.",
        "q and k are too large: initialise the query/key projections smaller (std 1/sqrt(d_model) or below, "
        "as GPT-2's 0.02), normalise q and k before their product (QK-layernorm), and check the attention scale "
        "(1/sqrt(head_dim), unless the initialisation folds it into the query weights as T5's does)", layer.index, layer.index)


def _vanishes_in_time(layer: LayerStats, lo: float) -> bool:
    r = layer.stats.get("time_grad_ratio")
    return r is not None and r < lo


def _other_flags(ev: list[_Evidence], i: int) -> set[str]:
    """The kinds that rules other than the time-wise one raised for row ``i``."""
    return {e.kind for e in ev if i in e.rows and e.rule != "time"}


def _time_problem(layer: LayerStats, lo: float) -> Problem:
    r, steps = layer.stats["time_grad_ratio"], layer.stats.get("time_steps")
    horizon = layer.stats.get("time_horizon")
    lstm = layer.kind == "LSTM"
    where = f"{layer.name} ({layer.kind} over {steps} steps)" if layer.name else \
        f"the model's {layer.kind} (over {steps} steps)"
    fix = ("set the forget-gate bias to 1 (Jozefowicz et al. 2015: b_f in bias_ih/bias_hh) so the cell state "
           "carries the gradient, " if lstm else "") + \
        ("use orthogonal recurrent weights (sp.init.orthogonal_ on weight_hh), a gated cell (LSTM/GRU) if this is "
         "a plain RNN, " if not lstm else "use orthogonal recurrent weights (sp.init.orthogonal_ on weight_hh), ") + \
        "or truncate backpropagation through time to the steps that are reached"
    cli = fix.replace("(sp.init.orthogonal_ on weight_hh)", "(--init orthogonal)").replace(
        "set the forget-gate bias to 1", "in the model's code, set the forget-gate bias to 1")
    smallest = (f"exactly 0 (it underflows, or an operation with a zero derivative cuts it), below the lower bound "
                f"{sci(lo)} times that at its best-reached step"
                if r == 0 else f"{r:.2g} times that at its best-reached step, below the lower bound {sci(lo)}")
    return Problem(
        layer.name, "vanishing",
        f"The gradient vanishes through time in {where}. The gradient reaching its input at the earliest steps is "
        f"{smallest}: only {horizon} of {steps} steps get a gradient within that range, so the earlier steps do not "
        "learn.", fix, layer.index, layer.index, cli_suggestion=cli)


def _row_verdict(layer: LayerStats, flags: set[str]) -> Verdict:
    if layer.nonfinite_fraction > 0 or (layer.grad_nonfinite_fraction or 0) > 0:
        return "non-finite"
    return cast(Verdict, next((k for k in SEVERITY[1:-1] if k in flags), "healthy"))


def _runs(rows: list[int], gap: int = 2) -> list[list[int]]:
    """Row indices grouped into runs; runs closer than ``gap`` rows merge (a
    Linear/activation pair can differ in which rows cross a limit)."""
    runs: list[list[int]] = []
    for i in sorted(rows):
        if runs and i - runs[-1][-1] <= gap + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _measured(layers: list[LayerStats], kind: str) -> list[int]:
    """The rows a share of ``kind`` ("dead", "saturated") is measured on."""
    attr = "dead_fraction" if kind == "dead" else "saturation"
    return [layer.index for layer in layers if getattr(layer, attr) is not None]


def _runs_among(rows: list[int], eligible: list[int], gap: int = 2) -> list[list[int]]:
    """:func:`_runs` counted along ``eligible`` (the rows a share is measured
    on: a deep ReLU net's ReLU rows, every other row): flagged rows with at
    most ``gap`` eligible rows between them are one run, so a depth where the
    dead share hovers about its limit (52%, 39%, 53%) is one problem, not one
    per layer."""
    pos = {i: k for k, i in enumerate(eligible)}
    runs: list[list[int]] = []
    for i in sorted(rows):
        if runs and i in pos and runs[-1][-1] in pos and pos[i] - pos[runs[-1][-1]] <= gap + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _by_role(rows: list[int], layers: list[LayerStats], kind: str) -> list[list[int]]:
    """Flagged rows of one role (the same module position in repeated blocks:
    every ReLU of a deep MLP; a module's calls, ``@k`` stripped) in runs along
    that role's own rows: two flagged rows are one problem when at most
    :data:`ROLE_GAP` rows of the role lie between them, or when every row
    between is at half the limit or more -- a share that hovers about its
    limit down a deep net (52%, 39%, 53%, ...) is one problem, not one per
    layer, while an encoder's and a decoder's uses of one activation module,
    healthy in between, stay two.
    Rows without a role in runs along the rows the share is measured on
    (:func:`_runs_among`).  In order of their first row."""
    by: dict[str, list[int]] = {}
    loose: list[int] = []
    for i in rows:
        role = _role_call(layers[i])[0]  # a module's k-th call is of its role too
        if role:
            by.setdefault(role, []).append(i)
        else:
            loose.append(i)
    groups = _runs_among(loose, _measured(layers, kind))
    attr, limit = ("dead_fraction", DEAD_SHARE) if kind == "dead" else ("saturation", SATURATED_SHARE)
    for role, flagged in by.items():
        mine = [layer.index for layer in layers if _role_call(layer)[0] == role]
        pos = {i: k for k, i in enumerate(mine)}
        run = [flagged[0]]
        for i in flagged[1:]:
            between = [layers[j] for j in mine[pos[run[-1]] + 1:pos[i]]]
            # close (a few rows of the role apart), or every row between near the limit too (hovering about it)
            if len(between) <= ROLE_GAP or all((getattr(b, attr) or 0.0) >= limit / 2 for b in between):
                run.append(i)
            else:
                groups.append(run)
                run = [i]
        groups.append(run)
    return sorted(groups, key=lambda g: g[0])


ROLE_GAP = 4  # rows of a role between two flagged ones that still make one problem (see _by_role)


def _dominant_activation(layers: list[LayerStats]) -> str | None:
    acts = [layer.activation.split("(")[0] for layer in layers if layer.activation and layer.activation != "linear"]
    return Counter(acts).most_common(1)[0][0] if acts else None


def _init_advice(act: str | None, cli: bool = False) -> str:
    """The re-initialisation that fixes a depth trend for this activation,
    as a Python call or (``cli``) as the ``--init`` flag of ``signalprop check``."""
    if act in ("relu", "leaky_relu"):
        return (("re-initialise with --init kaiming_normal" if cli else "use kaiming_normal_") +
                " (sigma_w2 = 2, where chi1 = 1 for ReLU): Xavier-style weights halve the gradient's mean square at "
                "every ReLU layer")
    if act == "sigmoid":
        return (("re-initialise with --init critical" if cli else
                 "initialize with signalprop.init.critical_(model, inputs)") +
                " (orthogonal weights on the critical line, with sigmoid's mean of 1/2 handled), or switch to "
                "tanh/ReLU")
    if act == "tanh":
        return ("re-initialise with --init critical (orthogonal weights on tanh's critical line)" if cli else
                "initialize with signalprop.init.critical_(model, inputs), or apply_(model, 'xavier_uniform', "
                "activation='tanh') (gain 1.59)")
    return (("re-initialise with --init critical" if cli else
             "initialize with signalprop.init.critical_(model, inputs)") +
            " or add residual connections / normalization")


def _span(layers: list[LayerStats], run: list[int]) -> str:
    a, b = layers[run[0]], layers[run[-1]]
    if a is not b and a.name == b.name:  # one module's calls: which ones
        return f"{a.name} (calls {_call_of(a)}–{_call_of(b)})"
    return a.name if a is b else f"{a.name} .. {b.name}"


def _where(layers: list[LayerStats], run: list[int]) -> str:
    """``in layers 0–99``, ``at transformer.ln_f``, ``from A to B``, ``at cell (calls 1–30)``."""
    a, b = layers[run[0]], layers[run[-1]]
    if a is not b and a.name == b.name:
        return f"at {module_label(a.name, a.kind)} (calls {_call_of(a)}–{_call_of(b)})"
    span = span_label(a.name, a.kind, b.name, b.kind)
    return span if span.startswith("from ") else (f"in {span}" if span.startswith("layers ") else f"at {span}")


def _which(layers: list[LayerStats], run: list[int], what: str) -> str:
    """The subject of a share problem: ``Sigmoid #1 is`` or ``50 Sigmoid layers (layers 1–99) are``."""
    rows = [layers[i] for i in run]
    if len(rows) == 1:
        return f"{_label(rows[0])} is {what}"
    kinds = " and ".join(sorted({layer.kind for layer in rows}))
    a, b = rows[0], rows[-1]
    return f"{len(rows)} {kinds} layers ({span_label(a.name, a.kind, b.name, b.kind)}) are {what}"


_RESIDUAL_FIX = ("the residual stream's variance grows with every block it sums a branch into: scale the residual "
                 "branches rather than every weight -- mark each branch (sp.init.mark_residual, or wrap it in "
                 "sp.init.ScaledResidual), then signalprop.init.scale_residual_(model, 'fixup') (Fixup, Zhang et al. "
                 "2019) or 'skipinit' (De & Smith 2020); or a 1/sqrt(depth) factor on each branch, or normalisation "
                 "inside each block")
_RESIDUAL_FIX_CLI = ("the residual stream's variance grows with every block it sums a branch into: scale the residual "
                     "branches rather than every weight -- for the built-in resmlp, residual=fixup (Fixup, Zhang et al. "
                     "2019) or residual=skipinit (De & Smith 2020) in the spec; in your own factory, mark each branch "
                     "(sp.init.mark_residual) and call sp.init.scale_residual_(model, 'fixup'), or add a 1/sqrt(depth) "
                     "factor or normalisation to each branch")
_EXPLODING_FIX = ("weights are too large: rescale them (apply_(model, 'xavier_uniform', activation=...) or "
                  "signalprop.init.critical_), and clip gradients (torch.nn.utils.clip_grad_norm_)")
_EXPLODING_FIX_CLI = ("weights are too large: rescale them with --init critical (or --init xavier_uniform), and clip "
                      "gradients in training (torch.nn.utils.clip_grad_norm_)")


def _problem(kind: Verdict, run: list[int], ev: list[_Evidence], layers: list[LayerStats], act: str | None,
             residual: bool = False, initialisable: bool = True) -> Problem:
    """One problem in three parts: what (the message's first sentence), why
    (its second: the number judged and what it is relative to), the fix
    (``suggestion``; ``cli_suggestion`` where the command line says it
    differently)."""
    span = _span(layers, run)
    rows = [layers[i] for i in run]
    if kind == "saturated":
        sat = max(layer.saturation or 0 for layer in rows)
        msg = (f"{_which(layers, run, 'saturated')}. Up to {sat:.0%} of the outputs sit where the activation's slope "
               f"is under 1% of its maximum (saturated means over {SATURATED_SHARE:.0%}), so the gradient through "
               "them nearly vanishes.")
        fix = ("pre-activations are too large: lower the weight scale (apply_(model, 'xavier_uniform', "
               f"activation=...)) or normalize; {_init_advice(act)}")
        cli = f"pre-activations are too large: {_init_advice(act, cli=True)}, or normalise them in the model"
    elif kind == "dead":
        dead = max(layer.dead_fraction or 0 for layer in rows)
        msg = (f"{_which(layers, run, 'dead')}. Up to {dead:.0%} of the units output 0 for every example and "
               f"position (dead means over {DEAD_SHARE:.0%})" +
               (", so no gradient reaches the layers before them." if dead >= 1.0 else "."))
        # a GELU/SiLU row dies where its pre-activations sit far below 0 (it underflows): no other smooth
        # activation is the cure there, a leaky one is
        other = "LeakyReLU/GELU" if act is None or "relu" in act else "LeakyReLU/ELU"
        fix = f"zero or shrink negative biases, use kaiming_normal_, lower the learning rate, or use {other}"
        cli = ("zero or shrink negative biases (--init kaiming_normal redraws the weights and zeroes the biases), "
               f"lower the learning rate, or use {other}")
    else:
        # the gradient's evidence first (the verdict is about it), the forward signal's where it is all there is
        mine = sorted((e for e in ev if e.kind == kind and e.rows & set(run)),
                      key=lambda e: (e.rule == "forward", -e.strength))
        where = _where(layers, run)
        if mine and mine[0].rule == "forward":
            what = f"The forward signal {'grows' if kind == 'exploding' else 'fades'} {where}."
        elif kind == "exploding":
            what = f"The gradient explodes toward the input {where}."
        else:
            what = f"The gradient vanishes {where}."
        msg = f"{what} {mine[0].why(set(run))}" if mine else what
        grows_with_depth = any(e.rule in ("forward", "series") for e in mine)
        if kind == "exploding" and residual and grows_with_depth:
            fix, cli = _RESIDUAL_FIX, _RESIDUAL_FIX_CLI
        elif kind == "vanishing" and any(layer.kind in _CELLS for layer in rows):
            fix = cli = _CELL_FIX
        elif kind == "vanishing" and not initialisable:
            fix = cli = _UNINITIALISABLE_FIX
        elif kind == "vanishing":
            fix, cli = _init_advice(act), _init_advice(act, cli=True)
        else:
            fix, cli = _EXPLODING_FIX, _EXPLODING_FIX_CLI
    return Problem(span, kind, msg, fix, run[0], run[-1], cli_suggestion=cli)


# recurrent cells a forward unrolls in a Python loop (signalprop.init leaves their weights alone)
_CELLS = frozenset({"RNNCell", "GRUCell", "LSTMCell"})
_CELL_FIX = ("the gradient fades through the cell's steps: start the recurrent weights orthogonal "
             "(torch.nn.init.orthogonal_ on weight_hh), an LSTM's forget-gate bias at 1 or more, use gated cells "
             "(GRU/LSTM) rather than a plain RNN cell, or train on shorter sequences (truncated backpropagation "
             "through time)")
_UNINITIALISABLE_FIX = ("the weights that scale the signal are used outside Linear/Conv modules (F.linear on a "
                        "ParameterList, say), which signalprop.init does not set: scale them as "
                        "torch.nn.init's xavier/kaiming would for the activation, or add residual connections / "
                        "normalization")


def _nonfinite_problem(layers: list[LayerStats], inp: InputStats | None, origin: int | None,
                       culprit: tuple[str, str, str, str] | None = None) -> Problem | None:
    if inp is not None and inp.nonfinite_fraction > 0:
        return Problem("input", "non-finite", f"The input itself is non-finite. {share(inp.nonfinite_fraction)} of its "
                       "values are NaN/Inf before any layer runs.",
                       "clean the data (torch.nan_to_num, check the loader)", -1, -1)
    if culprit is not None:
        name, phase, before, kind = culprit
        where = module_label(name, kind)
        by_name = {layer.name: layer for layer in layers}
        i = by_name[before].index if before in by_name else -1
        prev = _label(by_name[before]) if before in by_name else before
        what = ("The forward signal turns non-finite" if phase == "forward" else
                "The backward pass turns a finite gradient non-finite")
        return Problem(name or "(root)", "non-finite",
                       f"{what} in {where}'s own forward code, after {prev}. An operation written there (not a "
                       "submodule) made the NaN/Inf.",
                       "look at the arithmetic in that module's forward after " + prev + " (log/sqrt/pow of values "
                       "at or below 0, division by a tiny value, also in the branch torch.where does not select): "
                       "add an epsilon or clamp the argument", i, i)
    fwd = next((layer for layer in layers if layer.nonfinite_fraction > 0), None)
    if fwd is not None:
        return Problem(fwd.name, "non-finite",
                       f"The forward signal first turns non-finite at {_label(fwd)}. "
                       f"{share(fwd.nonfinite_fraction)} of its outputs are NaN/Inf while every earlier layer's are "
                       "finite.",
                       "look at that module's arithmetic (log/div/sqrt of bad values, overflow in low "
                       "precision); torch.autograd.detect_anomaly helps", fwd.index, fwd.index)
    bad = [layer for layer in layers if (layer.grad_nonfinite_fraction or 0) > 0]
    if bad and origin == -1:  # pipeline.AFTER_THE_ROWS: no layer made it, it came in with the loss's gradient
        o = bad[-1]
        return Problem(o.name, "non-finite",
                       f"The gradient arriving at {_label(o)} from the loss is already non-finite, while the forward "
                       f"pass is finite: no layer made the NaN/Inf, the loss did ({count(len(bad), 'layer')} carry it "
                       "back).",
                       "look at the loss and its targets: NaN/Inf among the targets (check the loader), a log or "
                       "division at 0 inside the loss (clamp its argument or add an epsilon)", o.index, o.index)
    if bad:
        o = layers[origin] if origin is not None else bad[-1]
        return Problem(o.name, "non-finite",
                       f"The backward pass turns a finite gradient non-finite at {_label(o)}. The forward pass is "
                       f"finite and the gradient arriving at it is too, but the gradient first turns non-finite "
                       f"there ({count(len(bad), 'layer')} before it carry it).",
                       "a derivative there is infinite (sqrt/pow/log at 0, division by a tiny value, also in the "
                       "branch torch.where does not select): add an epsilon, or clamp the argument",
                       o.index, o.index)
    return None


def _main_trend(trends: list[SeriesTrend], layers: list[LayerStats]) -> dict[str, Any]:
    """The longest repeated series of weight layers: its first/last ratio."""
    cands = [t for t in trends if layers[t.rows[0]].param_grad_rms is not None]
    if not cands:
        return {}
    t = max(cands, key=lambda t: (len(t.rows), -t.rows[0]))
    per = t.ratio ** (1.0 / (len(t.rows) - 1)) if t.ratio > 0 and math.isfinite(t.ratio) else float("nan")
    return {"first_last_grad_ratio": t.ratio, "geometric_mean_backward_gain": per, "first_layer": t.first,
            "last_layer": t.last, "param_layers": len(t.rows)}


def diagnose(layers: list[LayerStats], inp: InputStats | None, bounds: tuple[float, float], trend: float,
             backward_origin: int | None = None, dead_unjudged_from: int | None = None,
             culprit: tuple[str, str, str, str] | None = None, residual: bool = False,
             zero_gated: frozenset[str] = frozenset(), initialisable: bool = True
             ) -> tuple[Verdict, list[Problem], list[LayerStats], dict[str, Any]]:
    """The verdict, the problems (worst first), the rows with their own
    verdicts, and the model-level numbers for :class:`~signalprop.records.Summary`.
    ``dead_unjudged_from``: rows after this index carry statistics that
    training would not see (see ``check``), so their dead shares are not judged.
    ``culprit``: (module, phase, last row before it, the module's class) when a NaN/Inf was made
    by a module's own code between two rows (see ``pipeline._own_code_origin``).
    ``residual``: the model sums branches into a stream between its rows
    (residual blocks): a signal growing with depth is then the stream's, and
    the fix is the branches' scale.
    ``initialisable``: whether the model has a layer :mod:`signalprop.init`
    sets (a Linear or convolution, subclasses included): a vanishing problem's
    fix is a re-initialisation only then.
    ``zero_gated``: blocks (not rows, nor the model) that hold an all-zero
    gate of their own (:func:`signalprop.probe.pipeline.zero_gates`): an
    exact-0 gradient inside them is by design (see :func:`_zero_fed`).
    Pure: ``layers`` is not modified."""
    lo, hi = bounds
    # rectifier rows whose every output is 0 (a fact at any batch size): nothing passes back through them
    all_zero = [layer.index for layer in layers if (layer.dead_fraction or 0) >= 1.0]
    layers, notes = _judge_dead(layers, dead_unjudged_from)
    act = _dominant_activation(layers)
    series = _series(layers)
    ev_series, trends = _series_evidence(series, trend)
    ev = _bound_evidence(layers, lo, hi, zero_gated) + ev_series
    through_time = {layer.index for layer in layers if _vanishes_in_time(layer, lo)}
    if through_time:
        ev.append(_Evidence("vanishing", "time", set(through_time), "", 1.0))
    vanishing = set().union(*(e.rows for e in ev if e.kind == "vanishing"))
    fwd_vanishing = set().union(*(e.rows for e in ev if e.kind == "vanishing" and e.rule == "forward"))
    shares, explained = _share_evidence(layers, vanishing, fwd_vanishing, all_zero)
    for e in ev:
        if e.kind == "vanishing":
            e.rows -= explained
    ev += shares
    flags: list[set[str]] = [set() for _ in layers]
    for e in ev:
        for i in e.rows:
            flags[i].add(e.kind)
    verdicts = [_row_verdict(layer, f) for layer, f in zip(layers, flags)]
    # records are frozen: a row whose verdict does not change is shared, not copied
    out = [layer if v == layer.verdict else evolve(layer, verdict=v) for layer, v in zip(layers, verdicts)]
    problems: list[Problem] = []
    nf = _nonfinite_problem(out, inp, backward_origin, culprit)
    if nf is not None:
        problems.append(nf)
    else:  # with NaN/Inf about, bounds and trends would only repeat it
        for kind in ("exploding", "vanishing", "saturated", "dead"):
            rows = [i for i, f in enumerate(flags) if kind in f]
            if kind == "vanishing":  # one problem per recurrent module whose gradient dies inside its sequence
                problems += [_time_problem(out[i], lo) for i in rows if i in through_time]
                rows = [i for i in rows if i not in through_time or "vanishing" in _other_flags(ev, i)]
            if kind == "saturated":  # one problem per saturated attention, named by its module
                problems += [_attention_problem(out[i]) for i in rows if _attention_saturated(out[i])]
                rows = [i for i in rows if not _attention_saturated(out[i])]
            groups = _by_role(rows, out, kind) if kind in ("dead", "saturated") else _runs(rows)
            problems += [_problem(kind, run, ev, out, act, residual, initialisable) for run in groups]
    problems.sort(key=lambda p: (SEVERITY.index(p.kind), p.first))
    verdict: Verdict = problems[0].kind if problems else "healthy"
    judged = {"activation": act, "series": tuple(trends), "notes": notes,
              "zero_gradient_rows": sum(1 for layer in layers if layer.grad_rms == 0), **_main_trend(trends, layers)}
    return verdict, problems, out, judged
