"""Tiny float64 nets with exact Hessian and Gauss–Newton block traces (tests of analysis.exact and analysis.ggn)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import hasb
from analysis.hvp import composite

DT = torch.float64


def seq_loss(logits, y):
    """Mean cross-entropy over every position of [B, T, V] logits (the loss exact.py matches for sequences)."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def loss_for(logits, y):
    return seq_loss(logits, y) if logits.dim() == 3 else F.cross_entropy(logits, y)


def hessian_block_traces(model, batches, names):
    """Tr(H_ll) by torch.autograd.functional.hessian of the sample-weighted mean loss w.r.t. each W_l alone."""
    n = sum(len(y) for _, y in batches)
    out = []
    for nm in names:

        def f(w, nm=nm):
            tot = 0.0
            for x, y in batches:
                tot = tot + len(y) * loss_for(functional_call(model, {nm: w}, (x,), strict=False), y)
            return tot / n

        w0 = dict(model.named_parameters())[nm].detach().clone()
        with composite():
            H = torch.autograd.functional.hessian(f, w0, vectorize=True)
        out.append(H.reshape(w0.numel(), -1).trace().item())
    return np.array(out)


def gauss_newton_traces(model, batches, names):
    """Tr(G_ll) = (1/N) Σ_n (1/T) Σ_t Tr(J_ntᵀ (diag p − ppᵀ) J_nt), J by torch.autograd.functional.jacobian."""
    n = sum(len(y) for _, y in batches)
    out = []
    for nm in names:
        w0 = dict(model.named_parameters())[nm].detach().clone()
        tot = 0.0
        for x, _ in batches:
            logits = model(x).detach()
            J = torch.autograd.functional.jacobian(lambda w, nm=nm, x=x: functional_call(model, {nm: w}, (x,)), w0)
            seq = logits.dim() == 3
            p = torch.softmax(logits if seq else logits[:, None], -1)  # [B, T, V]
            J = J.reshape(*p.shape, w0.numel())
            M = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
            tot += torch.einsum("btvw,btvk,btwk->", M, J, J).item() / p.shape[1]
        out.append(tot / n)
    return np.array(out)


def batches_for(shape, n_classes, sizes=(7, 5), seed=0, seq_len=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in sizes:
        x = torch.randn(s, *shape, generator=g, dtype=DT)
        y = torch.randint(0, n_classes, (s,) if seq_len is None else (s, seq_len), generator=g)
        out.append((x, y))
    return out


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.LeakyReLU(0.1), nn.Linear(8, 5)).to(DT)


def depthwise_net():
    torch.manual_seed(1)
    return (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU6(),
            nn.Conv2d(4, 4, 3, padding=1, groups=4),
            nn.Hardtanh(),
            nn.Conv2d(4, 6, 1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Dropout(0.3),
            nn.Flatten(),
            nn.Linear(24, 5),
        )
        .to(DT)
        .eval()
    )


def randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


class ResBlockNet(nn.Module):
    """conv-BN-ReLU, a residual conv-BN branch added to its input, ReLU, max-pool, linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(h + self.bn2(self.conv2(h)))
        return self.fc(F.max_pool2d(h, 2).flatten(1))


class TinySeq(nn.Module):
    """x [B, T, 3] → logits [B, T, 6]: per-position linear, a conv over time (mixes positions), head."""

    def __init__(self):
        super().__init__()
        self.inp, self.mix, self.out = nn.Linear(3, 5), nn.Conv1d(5, 5, 3, padding=1), nn.Linear(5, 6)

    def forward(self, x):
        h = F.relu(self.inp(x))
        h = F.relu(self.mix(h.transpose(1, 2))).transpose(1, 2)
        return self.out(h)


def quantized_net():
    torch.manual_seed(4)
    m = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    x = torch.randn(8, 1, 6, 6)
    q = hasb.quantize_model(randomize_bn(m), bits=(8, 4, 2), example_input=x, fixed="none").to(DT).eval()
    return q


class GeluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.fc3 = nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(self.act(self.fc1(x)))))
