"""Faults the monitor's tests put into training (not collected: no ``test_`` prefix)."""

from __future__ import annotations

import math

import torch


class NanBackward(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are NaN
    (at any loss scale)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.nan
