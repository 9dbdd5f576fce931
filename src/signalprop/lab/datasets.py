"""Real data shipped with packages (no downloads): scikit-learn's bundled digits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    seed: int
    source: str

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def digits(seed: int = 0, val: float = 0.15, test: float = 0.25) -> Split:
    """scikit-learn's 1,797 bundled 8x8 digit images (64 features, 10 classes),
    split train/validation/test by a permutation from ``seed``; features are
    standardized with the training split's mean and standard deviation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a core dependency
        raise ImportError("the digits data set needs scikit-learn (a dependency of signalprop): "
                          "pip install scikit-learn") from e
    d = load_digits()
    x = d.data.astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test, n_val = int(round(test * len(y))), int(round(val * len(y)))
    te, va, tr = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6  # constant border pixels: sd 0
    x = (x - mu) / sd

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    return Split(t(x[tr]), t(y[tr]), t(x[va]), t(y[va]), t(x[te]), t(y[te]), seed, "sklearn.datasets.load_digits")
