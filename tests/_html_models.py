"""Models and runs whose HTML reports the report tests look at (shared by the
figure tests and the browser tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class BlockNet(nn.Module):
    """stem -> 12 named blocks (Linear, Tanh) -> head."""

    def __init__(self, depth: int = 12, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Linear(16, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def trend_only_report() -> sp.Report:
    """Every block's weights at 0.6 of the variance-preserving scale: the signal
    shrinks ~0.36x per block in E[y^2] (~0.6x in gradient), so over 12 blocks
    the depth-trend rule (limit 100x, 1e4x forward) calls it vanishing while
    every row's gradient stays inside the healthy band [1e-6, 1e3]: the case
    where only the drawn trend explains the verdict."""
    torch.manual_seed(0)
    m = BlockNet()
    g = torch.Generator().manual_seed(0)
    for b in m.blocks:
        nn.init.normal_(b.fc.weight, std=0.6 / 64 ** 0.5, generator=g)
        nn.init.zeros_(b.fc.bias)
    return sp.check(m, torch.randn(128, 16, generator=g))


def relu_run(steps: int = 120, lr: float = 0.1) -> sp.MonitorReport:
    """A ReLU MLP regressing with SGD (momentum 0.9) at a learning rate too large
    for it: updates too large, loss spikes, units die, then the loss turns
    non-finite (seed 0; each kind of alert is asserted only where a test needs it)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = x[:, :3].sum(1, keepdim=True)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                      nn.Linear(64, 1))
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
    with sp.monitor(m, every=5) as mon:
        for _ in range(steps):
            i = torch.randint(0, 512, (64,), generator=g)
            loss = F.mse_loss(m(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            mon.step(loss)
            opt.step()
    return mon.report()
