"""Monitor records as TensorBoard scalars and text.

Works with any writer that has ``add_scalar(tag, value, step)`` and
``add_text(tag, text, step)`` -- ``torch.utils.tensorboard.SummaryWriter``,
tensorboardX's -- so nothing here imports TensorBoard (but for PyTorch's own
writer, whose step's scalars go out as one event through TensorBoard's
``Summary`` record, which that writer needs installed).  Tags are stable:
``signalprop/loss``, ``signalprop/grad_norm``, ``signalprop/relative_update``
(||dw|| / ||w|| of the last optimizer step) every step that has them;
``signalprop/<quantity>/<layer>`` on sampled steps for the gradient RMS
relative to the output's and every statistic declared for TensorBoard in
:mod:`signalprop.statistics` (gradient RMS, forward second moment, max |y|
and max |gradient|, saturation and dead share); ``signalprop/update_ratio/<module>`` and the update statistics (update RMS,
over the learning rate, Adam's second-moment lag) when an update is measured;
alerts as text under ``signalprop/alerts``.

Histograms (on sampled steps, for writers with ``add_histogram_raw``; see
:mod:`signalprop.monitor.histograms` for what is sampled and at what cost):
``signalprop/activation/<layer>`` and ``signalprop/activation_grad/<layer>``
(each leaf module's output and the loss's gradient at it),
``signalprop/weight/<parameter>``, ``signalprop/grad/<parameter>`` and
``signalprop/update/<parameter>`` (the change made by the sampled step's
optimizer step, written at the sampled step's number).

A custom-scalars layout (TensorBoard's "Custom Scalars" tab) is written once
per writer, for writers with ``add_custom_scalars``: one chart per statistic
with every layer as a series (:func:`layout`).
"""

from __future__ import annotations

import functools
import io
import math
import re
import struct
import weakref
from typing import Any

from ..statistics import STATISTICS


def layer_quantities() -> tuple[str, ...]:
    """The per-layer tags of a sampled step: the gradient RMS relative to the
    output's (what the verdict judges), then every statistic declared for
    TensorBoard (:mod:`signalprop.statistics`)."""
    return ("relative_grad_rms", *(s.name for s in STATISTICS if s.tensorboard and s.phase != "update"))


def update_quantities() -> tuple[str, ...]:
    """The per-module tags of a measured optimizer step (update RMS, Adam's
    second-moment lag, ...: the statistics declared with phase "update")."""
    return tuple(s.name for s in STATISTICS if s.tensorboard and s.phase == "update")


def layout() -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout: the loss, gradient norm and relative update, then one
    multi-line chart per per-layer quantity whose series are the layers
    (TensorBoard reads each chart's tags as regular expressions)."""
    per_layer = {q: ["Multiline", [rf"^signalprop/{re.escape(q)}/"]] for q in (*layer_quantities(), "update_ratio")}
    return {"signalprop": {"loss": ["Multiline", [r"^signalprop/loss$"]],
                           "gradient norm": ["Multiline", [r"^signalprop/grad_norm$"]],
                           "relative update": ["Multiline", [r"^signalprop/relative_update$"]]},
            "signalprop per layer": per_layer}


_LAID_OUT: weakref.WeakSet[Any] = weakref.WeakSet()  # writers given the layout (once each: it is the writer's)


def write_layout(writer: Any) -> None:
    """:func:`layout` to ``writer``, once per writer (a no-op for writers without ``add_custom_scalars``)."""
    if not callable(getattr(writer, "add_custom_scalars", None)):
        return
    try:
        if writer in _LAID_OUT:
            return
        _LAID_OUT.add(writer)
    except TypeError:  # a writer that cannot be weakly referenced: given the layout each time it is asked
        pass
    writer.add_custom_scalars(layout())


class Tagged:
    """A writer whose tags name what is watched: ``signalprop/...`` becomes
    ``signalprop.<name>/...`` (its own section in TensorBoard), for several
    monitors writing to one writer (a GAN's two networks: their losses,
    gradient norms and same-named layers would share one series).  The
    writes below reach the writer inside as they would unwrapped (one event
    a step for PyTorch's ``SummaryWriter``)."""

    def __init__(self, writer: Any, name: str) -> None:
        self.writer = writer
        self.root = f"signalprop.{name}/"

    def _tag(self, tag: str) -> str:
        return self.root + tag.removeprefix("signalprop/")

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(self._tag(tag), value, step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(self._tag(tag), text, step)

    def add_histogram_raw(self, tag: str, *args: Any, **kwargs: Any) -> None:
        self.writer.add_histogram_raw(self._tag(tag), *args, **kwargs)


def inner(writer: Any) -> Any:
    """The writer a :class:`Tagged` one writes to; any other as it is."""
    return writer.writer if isinstance(writer, Tagged) else writer


def root(writer: Any) -> str:
    """The start of ``writer``'s tags: ``signalprop/``, or a :class:`Tagged` one's."""
    return writer.root if isinstance(writer, Tagged) else "signalprop/"


def writes_histograms(writer: Any) -> bool:
    """Whether ``writer`` can take the monitor's histograms (``add_histogram_raw``)."""
    return callable(getattr(inner(writer), "add_histogram_raw", None))


def write_histograms(writer: Any, items: list[tuple[int, str, Any]]) -> None:
    """``(step, tag, Histogram)`` items: to PyTorch's own ``SummaryWriter``
    as one event per step (as :func:`_write_scalars` does for scalars), to
    any other writer through ``add_histogram_raw``."""
    if not items:
        return
    if isinstance(writer, Tagged):
        items = [(k, writer._tag(tag), h) for k, tag, h in items]
        writer = writer.writer
    if _is_torch_writer(writer):
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

        steps: dict[int, list[Any]] = {}
        for k, tag, h in items:
            proto = HistogramProto(min=h.min, max=h.max, num=h.num, sum=h.sum, sum_squares=h.sum_squares,
                                   bucket_limit=list(h.bucket_limits), bucket=list(h.bucket_counts))
            steps.setdefault(k, []).append(Summary.Value(tag=tag, histo=proto))
        for k, values in steps.items():
            writer._get_file_writer().add_summary(Summary(value=values), k)
        return
    for k, tag, h in items:
        writer.add_histogram_raw(tag, h.min, h.max, h.num, h.sum, h.sum_squares, list(h.bucket_limits),
                                 list(h.bucket_counts), k)


def _is_torch_writer(writer: Any) -> bool:
    return type(writer).__module__.startswith("torch.utils.tensorboard") and hasattr(writer, "_get_file_writer")


_CHECKSUMMED: weakref.WeakSet[Any] = weakref.WeakSet()  # record writers looked at (given the C checksum or not)


def _masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C that TensorFlow's record format stores (TensorBoard's
    ``masked_crc32c``), from google-crc32c's C implementation."""
    import google_crc32c

    x = google_crc32c.value(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _write_record(out: Any, data: bytes) -> None:
    """One record as TensorBoard's ``RecordWriter.write`` frames it: length,
    its masked CRC, the data, the data's masked CRC."""
    header = struct.pack("<Q", len(data))
    out.write(header + struct.pack("<I", _masked_crc32c(header)) + data + struct.pack("<I", _masked_crc32c(data)))


def _same_records(record_writer_type: Any) -> bool:
    """Whether :func:`_write_record` frames records byte for byte as
    ``record_writer_type`` (TensorBoard's RecordWriter) does, on payloads of
    several lengths."""
    ours, theirs = io.BytesIO(), io.BytesIO()
    reference = record_writer_type(theirs)
    for n in (0, 1, 7, 255, 4099):
        payload = bytes((i * 131 + n) % 256 for i in range(n))
        reference.write(payload)
        _write_record(ours, payload)
    return ours.getvalue() == theirs.getvalue()


def fast_checksums(writer: Any) -> None:
    """Frame the records of ``writer`` -- PyTorch's ``SummaryWriter`` only --
    with google-crc32c's C checksum instead of TensorBoard's pure-Python
    one (installed with ``signalprop[tensorboard]``).

    TensorBoard without TensorFlow checksums every record in Python, ~0.2 us
    a byte, on its writer thread while holding the GIL: a sampled step's
    histograms (~500 kB on a 100-layer MLP) cost the training ~0.2 of a step.
    The files are the same bytes: the replacement is used only where it
    frames test records exactly as the writer's own ``RecordWriter`` does,
    and only for this writer's records (nothing else in the process
    changes).  Without google-crc32c's C build, or with a TensorBoard laid
    out otherwise, the writer is left as it is."""
    writer = inner(writer)
    if not _is_torch_writer(writer):
        return
    try:
        record_writer = writer._get_file_writer().event_writer._async_writer._writer
        if record_writer in _CHECKSUMMED:
            return
        _CHECKSUMMED.add(record_writer)
        import google_crc32c

        if google_crc32c.implementation != "c" or "write" in vars(record_writer):
            return
        if not _same_records(type(record_writer)):
            return
        record_writer.write = functools.partial(_write_record, record_writer._writer)
    except (ImportError, AttributeError, TypeError):
        return


def _add(out: list[tuple[str, float]], tag: str, value: float | None) -> None:
    if value is not None and math.isfinite(value):
        out.append((tag, float(value)))


def _write_scalars(writer: Any, scalars: list[tuple[str, float]], step: int) -> None:
    """``add_scalar`` for each; for PyTorch's own ``SummaryWriter``, all of
    them as one event with one value per tag instead (what ``add_scalar``
    writes, one value at a time: ~50 us per call, ~1,000 calls on a sampled
    step of a 200-row model, against ~2 us per value in one event).
    TensorBoard reads both alike."""
    if not scalars:
        return
    if isinstance(writer, Tagged):
        scalars = [(writer._tag(t), v) for t, v in scalars]
        writer = writer.writer
    if _is_torch_writer(writer):
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in scalars])
        writer._get_file_writer().add_summary(summary, step)
        return
    for tag, v in scalars:
        writer.add_scalar(tag, v, step)


def write_step(writer: Any, mon: Any, step: int, alerts: list[Any]) -> None:
    """What ``mon.step`` learned at ``step``."""
    write_layout(writer)
    fast_checksums(writer)
    now: list[tuple[str, float]] = []
    _add(now, "signalprop/loss", mon.losses[-1])
    _add(now, "signalprop/grad_norm", mon.grad_norms[-1])
    _add(now, "signalprop/relative_update", mon.relative_updates[-1] if mon.relative_updates else None)
    scale = getattr(mon, "_scale", None)
    if scale is not None and scale.last is not None:  # a GradScaler's: its scale, and each step it skipped (1)
        _add(now, "signalprop/loss_scale", scale.last)
    for skipped in getattr(mon, "scaler_skipped", [])[-2:]:  # this step's and the previous one's, found now
        if skipped not in mon._written_skips:
            mon._written_skips.add(skipped)
            _write_scalars(writer, [("signalprop/scaler_skipped", 1.0)], skipped)
    h = mon.history[-1] if mon.history else None
    if h is not None and h.step == step:
        seen = set()
        quantities = layer_quantities()
        for layer in h.layers:
            if layer.name in seen:  # a module called twice: its first call
                continue
            seen.add(layer.name)
            for q in quantities:
                _add(now, f"signalprop/{q}/{layer.name or '(root)'}", getattr(layer, q))
    _write_scalars(writer, now, step)
    for h in reversed(mon.history[-3:]):  # an update measured at this step belongs to a sample 2 steps back
        if h.update_ratios and h.step not in mon._written_updates:
            mon._written_updates.add(h.step)
            ups: list[tuple[str, float]] = []
            for name, r in h.update_ratios:
                _add(ups, f"signalprop/update_ratio/{name or '(root)'}", r)
            seen_u: set[str] = set()
            for layer in h.layers:
                if layer.name not in seen_u:
                    seen_u.add(layer.name)
                    for q in update_quantities():
                        _add(ups, f"signalprop/{q}/{layer.name or '(root)'}", getattr(layer, q))
            _write_scalars(writer, ups, h.step)
    for a in alerts:
        writer.add_text("signalprop/alerts", str(a), step)
    tap = getattr(mon, "_histograms", None)
    if tap is not None:
        try:
            tap.step(writer, step)
        except Exception as e:  # the histograms are a guest's too: a warning, the step goes on
            mon._warn("histograms were not written", e)
