"""The resolvent of J J^T for a product of free layers, by continuation in x.

:func:`signalprop.theory.jacobian_density` asks for G(z) = E[1 / (z - lambda)]
over the eigenvalues lambda of J J^T at z = x (1 + i eta).  G comes from one
complex equation with many roots (one per L-th root of unity, two sheets at
every spectral edge); only one is the density.  Which one is known beyond the
right edge, where psi = z G - 1 ~ mean / z, and is followed from there by
continuation.  The path is fixed by x alone: a log-spaced lattice walked down
from beyond the edge, then from the lattice point just above x to x, so the
value at x never depends on which other points were asked for.

The unknown is y = psi / (1 + psi).  Unlike psi, it keeps its relative
precision at both ends: y ~ mean / z far right (psi -> 0) and y ~ -1 / (z G)
far left (psi -> -1, where 1 + psi = z G is all the density there is, and
carrying psi itself cancels it away).  With r = (S_{D^2} S_W)(psi), the
product rule S_J = r^L and chi_J(psi) = 1 / z give r^L = 1 / (y z), so the
root of unity is the branch of log(y z), tracked continuously; u = chi_{D^2}(psi)
= y r / S_W, and the equation is psi_{D^2}(u) = psi.
"""

from __future__ import annotations

import bisect
import cmath
import math
from typing import NamedTuple

import numpy as np

PER_DECADE = 16  # lattice points per decade of x: the continuation's coarse steps
_NEWTON_ITERS = 40
_REL_TOL = 1e-12
# A step is accepted when its root is the continuation of the previous one: y and the root's phase move
# little.  Near an edge y changes on a relative scale eta, so these send the walk into steps ~ eta x there.
_MAX_LOG_Y_JUMP = 0.3
_MAX_PHASE_JUMP = 0.3


class _State(NamedTuple):
    x: float
    y: complex
    log_yz: complex  # its imaginary part continuous along the path: fixes the L-th root


class Resolvent:
    """psi's continuation for D^2 ~ ``lam`` (weights ``wq``) and ``depth``
    layers of weights with variance ``sigma_w2`` (``gaussian`` or orthogonal)."""

    def __init__(self, lam: np.ndarray, wq: np.ndarray, sigma_w2: float, depth: int, gaussian: bool,
                 eta: float) -> None:
        keep = wq > 0
        self.lam, self.wq = lam[keep], wq[keep]
        self.sigma_w2, self.depth, self.gaussian, self.eta = sigma_w2, depth, gaussian, eta
        # D^2's zero eigenvalues (ReLU's dead units) are J J^T's too: free products keep the larger kernel
        self.atom = float(np.sum(self.wq[self.lam == 0]))
        self.mean = float(sigma_w2 * np.sum(self.wq * self.lam)) ** depth
        # The right edge is at most (max lam)^L times that of the weights' product alone: sigma_w2^L
        # (orthogonal) or the Fuss-Catalan edge sigma_w2^L (L + 1)^(L + 1) / L^L (L free Gaussian W W^T).
        log_edge = depth * math.log(sigma_w2 * max(float(self.lam.max()), 1e-300))
        if gaussian:
            log_edge += (depth + 1) * math.log(depth + 1) - depth * math.log(depth)
        # 1e3 times the edge, where psi's series m1 / z + m2 / z^2 + ... is 0.1% from its first term
        self.k_low = math.ceil(PER_DECADE * (log_edge / math.log(10) + 3))
        # every state the walk down the lattice accepted, x decreasing: a point's own walk starts at
        # the nearest one above it, so it rarely repeats the short steps an edge needed
        self._path = [self._start(10 ** (self.k_low / PER_DECADE))]

    def _equation(self, y: complex, z: complex, phase_ref: float) -> tuple[complex, complex, complex]:
        """F = psi_D(u) / y - (1 + psi_D(u)), zero where psi_D(u) = psi; dF / d ln y
        (Newton in ln y: |y| runs from ~1e-20 to ~1e300 over the x a user may ask
        for, and y^2 would overflow); log(y z) on the branch nearest ``phase_ref``.
        Dividing by y removes the spurious root y -> 0 (psi_D(u) ~ y^(1 - 1/L) there)."""
        ell = cmath.log(y * z)
        ell = complex(ell.real, ell.imag + 2 * math.pi * round((phase_ref - ell.imag) / (2 * math.pi)))
        r = cmath.exp(-ell / self.depth)
        t = 1 / (1 - y)  # 1 + psi
        u = self.sigma_w2 * y * r * (t if self.gaussian else 1.0)
        a = 1 / (1 - u * self.lam)
        ula = u * self.lam * a
        e1 = complex(np.dot(self.wq, a))  # 1 + psi_D(u), summed directly: exact where it is tiny
        psi_d = complex(np.dot(self.wq, ula))  # summed directly: exact where it is tiny
        # d psi_D / d ln u = d e1 / d ln u = E[u lam a^2]; a^2 alone underflows where |u| > 1e154
        dlnu = (1 - 1 / self.depth) + (y * t if self.gaussian else 0.0)  # d ln u / d ln y
        m = complex(np.dot(self.wq, ula * a)) * dlnu
        return psi_d / y - e1, m * (1 / y - 1) - psi_d / y, ell

    def _newton(self, y: complex, x: float, phase_ref: float) -> _State | None:
        z = complex(x, self.eta * x)
        for _ in range(_NEWTON_ITERS):
            f, df, ell = self._equation(y, z, phase_ref)
            if df == 0 or not (cmath.isfinite(f) and cmath.isfinite(df)):
                return None
            step = f / df
            if abs(step) > 0.5:  # not in the root's basin: a shorter continuation step will be
                return None
            y *= cmath.exp(-step)
            if abs(step) <= _REL_TOL:
                ell = self._equation(y, z, ell.imag)[2]
                return _State(x, y, ell)
        return None

    def _accept(self, new: _State | None, old: _State) -> bool:
        if new is None:
            return False
        z = complex(new.x, self.eta * new.x)
        g = 1 / ((1 - new.y) * z)
        return (abs(cmath.log(new.y / old.y)) < _MAX_LOG_Y_JUMP
                and (self.depth == 1 or abs(new.log_yz.imag - old.log_yz.imag) < _MAX_PHASE_JUMP)
                and g.imag <= 1e-9 * abs(g))  # -Im G >= 0: the density's sheet, not its mirror

    def _walk(self, state: _State, x: float, trail: list[_State] | None = None) -> _State:
        """From ``state`` to ``x`` in steps that each keep the root's branch,
        halving a step (in log x) until it does; each accepted state appended
        to ``trail``."""
        h = abs(math.log(x / state.x))
        shortest = 1e-3 * self.eta  # the root moves on a relative scale eta at an edge: far finer is noise
        while state.x != x:
            remaining = math.log(x / state.x)
            step = remaining if abs(remaining) <= h else math.copysign(h, remaining)
            while True:
                target = x if step == remaining else state.x * math.exp(step)
                new = self._newton(state.y, target, state.log_yz.imag)
                if self._accept(new, state):
                    break
                if abs(step) < shortest:  # not reached in the tests: a guard that ends the walk rather than crawl
                    new = self._newton(state.y, x, state.log_yz.imag) or _State(x, state.y, state.log_yz)
                    break
                step /= 2
            assert new is not None
            state, h = new, 2 * abs(step)  # lengthen again after a short step
            if trail is not None:
                trail.append(state)
        return state

    def _start(self, x: float) -> _State:
        """Beyond the right edge, from psi's series: Newton needs no continuation there."""
        z = complex(x, self.eta * x)
        psi = self.mean / z
        y0 = psi / (1 + psi)
        guess = _State(x, y0, cmath.log(y0 * z))
        return self._newton(y0, x, guess.log_yz.imag) or guess

    def _nearest_above(self, x: float) -> _State:
        """The lattice walk's last state at or above ``x``, the walk extended
        down to the lattice point at or below ``x`` first.  The walk from the
        top is the same however far down it has gone, so this depends on x alone."""
        if x >= self._path[0].x:
            return self._start(x)
        k = math.floor(PER_DECADE * math.log10(x))
        while self.k_low > k:
            self.k_low -= 1
            self._walk(self._path[-1], 10 ** (self.k_low / PER_DECADE), self._path)
        return self._path[bisect.bisect_right(self._path, -x, key=lambda s: -s.x) - 1]

    def density(self, x: float) -> float:
        """-Im G_c(z) / pi at z = x (1 + i eta), G_c without the point mass at 0."""
        z = complex(x, self.eta * x)
        if self.depth == 1 and not self.gaussian:
            # J J^T = sigma_w2 D^2 exactly, and D^2 is the quadrature's discrete law: G is its sum, and
            # continuation would have to thread between its atoms, where G nearly vanishes and y ~ 1 / G
            lam = self.lam[self.lam != 0]
            g = complex(np.dot(self.wq[self.lam != 0], 1 / (z - self.sigma_w2 * lam)))
        else:
            g = (1 / (1 - self._walk(self._nearest_above(x), x).y) - self.atom) / z
        return max(-g.imag / math.pi, 0.0)
