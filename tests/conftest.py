import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "agg")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def gen():
    """A fixed-seed generator: every statistical test is reproducible."""
    return torch.Generator().manual_seed(1234)
