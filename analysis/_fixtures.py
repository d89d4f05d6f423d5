"""A tiny deterministic network + data whose exact Hessian blocks are cheap (tests, benchmarks, docs).

~1k weights in four blocks (conv 1→4, conv 4→8 stride 2, conv 8→8 stride 2, linear 8→10), BatchNorm
with non-trivial running statistics (eval mode), ReLU and tanh; two batches of unequal size so the
sample weighting of the batch average is exercised.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = torch.tanh(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def tiny_problem(seed: int = 0, dtype: torch.dtype = torch.float64, sizes=(40, 24)):
    """(model in eval mode, [(x [B,1,8,8], y [B]), ...]) — deterministic in ``seed``."""
    torch.manual_seed(seed)
    m = TinyNet().to(dtype).eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=g)
    out, i = [], 0
    for s in sizes:
        out.append((x[i:i + s], y[i:i + s]))
        i += s
    return m, out


def exact_block_hessians(op) -> list[torch.Tensor]:
    """Dense H_ll [n_l, n_l] of every block of a HessianOperator, by n_l unit-vector HVPs each."""
    out = []
    for l, n in enumerate(op.numels):
        E = torch.eye(n, dtype=op.dtype, device=op.device).reshape(n, *op.shapes[l])
        out.append(op.block_hvp({l: E})[l].reshape(n, n).double().cpu())
    return out


def exact_full_hessian(op) -> torch.Tensor:
    """Dense H [n, n] over all blocks, by n unit-vector HVPs (chunks of 128)."""
    from .hvp import flatten, unflatten

    n = sum(op.numels)
    cols = []
    for s in range(0, n, 128):
        k = min(128, n - s)
        E = torch.zeros(k, n, dtype=op.dtype, device=op.device)
        E[torch.arange(k), torch.arange(s, s + k)] = 1
        cols.append(flatten(op.hvp(unflatten(E, op.shapes))).double().cpu())
    return torch.cat(cols)
