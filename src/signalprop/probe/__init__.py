"""Hooks on any nn.Module -> per-layer records; ``check``; Jacobian spectra."""

from .check import ModelError, check
from .recorder import Recorder

__all__ = ["ModelError", "Recorder", "check"]
