"""Reproducible experiments: the seed's demonstrations, depth sweeps."""

from .registry import Experiment, experiments, run_experiment

__all__ = ["Experiment", "experiments", "run_experiment"]
