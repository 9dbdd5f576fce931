"""Reproducible experiments: the demonstrations of Dive into Deep Learning's chapter
on numerical stability and initialization, depth sweeps, monitored training runs."""

from .registry import Experiment, experiments, run_experiment

__all__ = ["Experiment", "experiments", "run_experiment"]
