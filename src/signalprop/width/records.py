"""The records of a coordinate check (frozen, stdlib only, ``to_dict()`` each)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from ..records import _clean

CoordVerdict = Literal["width-stable", "grows", "shrinks"]
COORD_VERDICTS: tuple[str, ...] = get_args(CoordVerdict)
Role = Literal["activation", "update", "logits", "attention"]
ROLES: tuple[str, ...] = get_args(Role)
Statistic = Literal["l1", "rms"]
STATISTIC_NAMES: tuple[str, ...] = get_args(Statistic)


@dataclass(frozen=True)
class CoordSeries:
    """One layer's statistic at one reading: ``values[i][j]`` at seed
    ``seeds[i]`` and width ``widths[j]`` (one tidy row per layer, role and step,
    as mup's coord check keeps them); the fitted log-log slope and its error."""

    layer: str
    role: Role
    step: int
    widths: tuple[int, ...]
    seeds: tuple[int, ...]
    values: tuple[tuple[float, ...], ...]
    slope: float
    slope_se: float

    @property
    def mean(self) -> tuple[float, ...]:
        """The mean over seeds at each width."""
        return tuple(sum(col) / len(col) for col in zip(*self.values))

    def to_dict(self) -> dict[str, Any]:
        return _clean({**asdict(self), "mean": list(self.mean)})


@dataclass(frozen=True)
class CoordLayer:
    """A layer's verdict: ``slope`` ± ``slope_se`` is the fit at ``step``, the
    reading that decided (the steepest growth, else the last reading);
    ``slopes`` has one fit per reading (NaN where nothing could be fitted);
    ``leaves_range_at`` the width at which the fitted power law leaves the
    healthy range (None when width-stable)."""

    name: str
    role: Role
    kind: str
    position: str  # "input layer", "hidden layer", "output layer" or "layer" (from which fans grow)
    verdict: CoordVerdict
    slope: float
    slope_se: float
    step: int
    slopes: tuple[float, ...]
    slope_ses: tuple[float, ...]
    leaves_range_at: int | None
    message: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


@dataclass(frozen=True)
class CoordCheck:
    """The result of :func:`signalprop.coord_check`: ``verdict`` is
    ``"grows"`` when any layer grows, else ``"shrinks"`` when any shrinks,
    else ``"width-stable"``; ``layers`` in the order of the first forward
    pass; ``series`` every (layer, role, step) curve."""

    verdict: CoordVerdict
    layers: tuple[CoordLayer, ...]
    series: tuple[CoordSeries, ...]
    widths: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: int
    statistic: Statistic
    optimizer: str
    model: str
    thresholds: dict[str, Any]
    notes: tuple[str, ...] = ()
    seconds: float = math.nan

    @property
    def problems(self) -> tuple[CoordLayer, ...]:
        """The layers that are not width-stable, growing first."""
        return tuple(sorted((x for x in self.layers if x.verdict != "width-stable"),
                            key=lambda x: (x.verdict != "grows", -abs(x.slope))))

    def layer(self, name: str, role: str = "activation") -> CoordLayer:
        for x in self.layers:
            if x.name == name and x.role == role:
                return x
        raise KeyError(f"no layer {name!r} with role {role!r}; layers: {sorted({x.name for x in self.layers})}")

    def curve(self, name: str, role: str = "activation", step: int = 0) -> CoordSeries:
        for s in self.series:
            if s.layer == name and s.role == role and s.step == step:
                return s
        raise KeyError(f"no series for {name!r} / {role!r} at step {step}")

    def to_dict(self) -> dict[str, Any]:
        return _clean({
            "verdict": self.verdict, "widths": list(self.widths), "seeds": list(self.seeds), "steps": self.steps,
            "statistic": self.statistic, "optimizer": self.optimizer, "model": self.model,
            "thresholds": self.thresholds, "notes": list(self.notes), "seconds": self.seconds,
            "layers": [x.to_dict() for x in self.layers], "series": [s.to_dict() for s in self.series],
        })

    def to_json(self, path: Any = None, indent: int = 2) -> str:
        import json

        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            from pathlib import Path

            Path(path).write_text(text)
        return text

    def save_html(self, path: Any) -> Any:
        """One self-contained HTML file: per layer, scale against width on
        log-log axes (one line per step) with its verdict beside it."""
        from ..report.coord_html import save_html

        return save_html(self, path)

    def __str__(self) -> str:
        lines = [f"coordinate check of {self.model}: {self.verdict} "
                 f"(widths {', '.join(map(str, self.widths))}; {len(self.seeds)} seed(s); {self.steps} step(s); "
                 f"{self.optimizer})"]
        for p in self.problems:
            lines.append(f"  {p.verdict}: {p.message}\n    fix: {p.fix}")
        if not self.problems:
            lines.append(f"  all {len(self.layers)} layer readings width-stable "
                         f"(|slope| <= {self.thresholds.get('slope_tolerance')})")
        return "\n".join(lines)
