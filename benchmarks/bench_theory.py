"""Critical point of an arbitrary Python callable, and a 100 x 100 phase diagram.
Targets: one solve <= 20 ms; the grid <= 2 s."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from _util import median_time, run_cli, write
from signalprop import theory


def my_act(x: np.ndarray) -> np.ndarray:  # not in the registry: a scaled, shifted softsign
    return 1.3 * x / (1.0 + np.abs(x)) + 0.1 * np.tanh(x)


def main(out: Path, repeat: int) -> dict:
    from signalprop import activations

    act = activations.resolve(my_act)  # wrapping (kink detection) counted separately
    wrap = median_time(lambda: activations.resolve(my_act), repeat)
    solve = median_time(lambda: theory.critical_sigma_w2(act, 0.05), repeat)
    w, b = np.linspace(0.5, 4.0, 100), np.linspace(0.0, 0.3, 100)
    grid = median_time(lambda: theory.phase_diagram("tanh", w, b), max(3, repeat // 2))
    grid_erf = median_time(lambda: theory.phase_diagram("erf", w, b), max(3, repeat // 2))
    rows = {
        "critical_point_callable": {"median_s": solve, "target_s": 0.020, "ratio_to_target": solve / 0.020,
                                    "wrap_callable_median_s": wrap},
        "phase_diagram_100x100": {"median_s": grid, "target_s": 2.0, "ratio_to_target": grid / 2.0},
        "phase_diagram_100x100_erf": {"median_s": grid_erf, "target_s": 2.0, "ratio_to_target": grid_erf / 2.0},
    }
    write(out, "bench_theory", rows)
    return rows


if __name__ == "__main__":
    run_cli(main, 7)
