"""A tiny deterministic network + data whose exact Hessian blocks are cheap (tests, benchmarks, docs).

652 weights in four blocks (conv 1→4, conv 4→8 stride 2, conv 8→4 stride 2, linear 4→10), BatchNorm
with non-trivial running statistics (eval mode), ReLU and tanh; two batches of unequal size so the
sample weighting of the batch average is exercised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from analysis.hvp import HessianOperator, flatten, rademacher, unflatten
from analysis.trace import estimate_traces


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = torch.tanh(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def tiny_problem(seed: int = 0, dtype: torch.dtype = torch.float64, sizes=(24, 16)):
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
        out.append((x[i : i + s], y[i : i + s]))
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
    n = sum(op.numels)
    cols = []
    for s in range(0, n, 128):
        k = min(128, n - s)
        E = torch.zeros(k, n, dtype=op.dtype, device=op.device)
        E[torch.arange(k), torch.arange(s, s + k)] = 1
        cols.append(flatten(op.hvp(unflatten(E, op.shapes))).double().cpu())
    return torch.cat(cols)


def distributed_worker(rank: int, world: int, init_file: str, out_path: str) -> None:
    """One rank of the distributed test: HVPs and traces of :func:`tiny_problem` over a gloo group.

    Every rank passes the full batch list; the operator shards it.  Rank 0 saves its results.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = distributed_reference(sizes=(24, 16, 8, 20, 12))
        if rank == 0:
            torch.save(out, out_path)
        dist.barrier()  # no rank tears gloo down while its peer is still in a collective (seen: SIGABRT under load)
    finally:
        dist.destroy_process_group()


def distributed_reference(sizes=(24, 16, 8, 20, 12)) -> dict:
    """HVPs on fixed probes, block HVPs and a Hutch++ trace run (fixed seed) of a 5-batch problem."""
    model, batches = tiny_problem(seed=2, sizes=sizes)
    op = HessianOperator(model, batches, backend="double_backward")
    g = torch.Generator().manual_seed(0)
    V = [rademacher((3, *s), g, torch.float64) for s in op.shapes]
    hv = op.hvp(V)
    bh = op.block_hvp({1: V[1], 3: V[3]})
    r = estimate_traces(op, "hutchpp", rtol=0.1, max_hvp=200, sketch=4, seed=0)
    return {
        "hv": hv,
        "block": [bh[1], bh[3]],
        "trace": torch.tensor(r.trace),
        "stderr": torch.tensor(r.stderr),
        "n_total": op.n_total,
    }


TINY_RESNET20 = "tests.support.analysis_fixtures:tiny_resnet20"


def tiny_resnet20(num_classes: int = 10, in_channels: int = 1, **_) -> nn.Module:
    """ResNet-20's shape (3 stages × 3 pre-activation blocks, 22 weight layers) at widths 4/8/8: fast on CPU."""
    from hasb.models.resnet import PreActResNet

    return PreActResNet((3, 3, 3), (4, 8, 8), num_classes, in_channels)


def train_multi_precision(
    x: torch.Tensor, y: torch.Tensor, bits=(8, 4), steps: int = 30, batch: int = 32, lr: float = 0.01, seed: int = 0
) -> nn.Module:
    """A :func:`tiny_resnet20` trained as the multi-precision stage trains (every step, each bit in turn).

    x [N, 1, 28, 28], y [N]. Like the real stage, only the BN entries of ``bits`` ever see data: the fp path's
    BN entries keep their initial statistics (mean 0, var 1), the untrained path issue 10 found measured.
    """
    import hasb
    from hasb.models import build_model

    torch.manual_seed(seed)
    model = build_model(TINY_RESNET20, num_classes=10, in_channels=1, image_size=28)
    q = hasb.quantize_model(model, bits=list(bits), example_input=x[:32])
    # quantizer steps at a tenth of the weights' rate (as ALRS does for the top bit's neighbours): at the full
    # rate Adam pushes 8-bit activation steps of ~0.05 negative within a few steps and the net stops learning
    scales = [p for n, p in q.named_parameters() if "scale" in n]
    rest = [p for n, p in q.named_parameters() if "scale" not in n]
    opt = torch.optim.Adam([{"params": rest}, {"params": scales, "lr": lr / 10}], lr=lr)
    q.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        opt.zero_grad()
        for b in bits:
            hasb.set_config(q, b)
            F.cross_entropy(q(x[idx]), y[idx]).backward()
        opt.step()
    hasb.set_config(q, bits[0])
    return q.eval()
