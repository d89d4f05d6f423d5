"""Hessian spectrum: top eigenvalues by Lanczos, spectral density by stochastic Lanczos quadrature (SLQ).

Both work on any symmetric operator given as ``matvec: [n] -> [n]``; helpers build
it for the whole parameter subset of a :class:`HessianOperator` or for one layer
block H_ll.  Lanczos vectors are kept in float64 with full
reorthogonalisation (two Gram–Schmidt passes), so Ritz values do not get
spurious copies; tridiagonal eigenproblems use ``torch.linalg.eigh``.

SLQ (Lin, Saad & Yang 2016; Ghorbani et al. 2019): for a unit probe v, m Lanczos
steps give T = S Θ Sᵀ; the quadrature nodes θ_i with weights τ_i = S_{1i}²
(Σ τ_i = 1) match vᵀ f(H) v for polynomials f of degree < 2m.  The density is
the probe-averaged Σ τ_i N(λ; θ_i, σ²), so it integrates to 1 and its first
moment is the probe average of vᵀHv, an unbiased estimate of Tr(H)/n.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .hvp import HessianOperator, flatten, unflatten

MatVec = Callable[[torch.Tensor], torch.Tensor]


def operator_matvec(op: HessianOperator, block: int | None = None) -> tuple[MatVec, int]:
    """(matvec, n) for the whole subset (``block=None``) or for the diagonal block H_ll (``block=l``)."""
    if block is None:

        def mv(x: torch.Tensor) -> torch.Tensor:
            V = unflatten(x.to(op.dtype, copy=False).to(op.device)[None], op.shapes)
            return flatten(op.hvp(V))[0].double()

        return mv, sum(op.numels)

    def mvb(x: torch.Tensor) -> torch.Tensor:
        v = x.to(op.dtype).to(op.device).reshape(1, *op.shapes[block])
        return op.block_hvp({block: v})[block].reshape(-1).double()

    return mvb, op.numels[block]


def lanczos(matvec: MatVec, v0: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """m steps of Lanczos with full reorthogonalisation from v0 [n].

    Returns (alpha [m'], beta [m'-1], Q [m', n], beta_next) with m' ≤ m (early stop on an invariant
    subspace, then beta_next = 0); T = tridiag(beta, alpha, beta) and QᵀHQ = T up to round-off;
    beta_next is the norm of the next residual, which bounds the Ritz residuals.
    """
    n = v0.numel()
    m = min(m, n)
    Q = torch.zeros(m, n, dtype=torch.float64, device=v0.device)
    alpha, beta = [], []
    b_next = 0.0
    q = v0.double() / v0.double().norm()
    for j in range(m):
        Q[j] = q
        w = matvec(q).double()
        a = torch.dot(q, w)
        alpha.append(a)
        for _ in range(2):  # full reorthogonalisation, twice is enough (Kahan–Parlett)
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        b = w.norm()
        if b <= 1e-10 * max(abs(float(a)), 1e-30):
            break
        if j == m - 1:
            b_next = float(b)
            break
        beta.append(b)
        q = w / b
    k = len(alpha)
    return (
        torch.stack(alpha),
        (torch.stack(beta[: k - 1]) if k > 1 else torch.zeros(0, dtype=torch.float64)),
        Q[:k],
        b_next,
    )


def tridiag(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    T = torch.diag(alpha)
    if beta.numel():
        T = T + torch.diag(beta, 1) + torch.diag(beta, -1)
    return T


def top_eigenvalues(
    matvec: MatVec,
    n: int,
    k: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    which: str = "LA",
    seed: int = 0,
    device=None,
) -> np.ndarray:
    """The k algebraically largest (``which="LA"``) or largest-magnitude (``"LM"``) eigenvalues, descending.

    Runs Lanczos from a Gaussian start for m = max(k+10, 20) steps, doubling m (restart from the same
    start) until the Ritz residuals β_next·|S_mi| of the wanted values are ≤ tol·|θ_i|, or m = max_iter.
    """
    if which not in ("LA", "LM"):
        raise ValueError(f"which must be 'LA' or 'LM', got {which!r}")
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(n, generator=g, dtype=torch.float64).to(device)
    m = min(max(k + 10, 20), n, max_iter)
    while True:
        alpha, beta, _, b_next = lanczos(matvec, v0, m)
        theta, S = torch.linalg.eigh(tridiag(alpha, beta))
        order = torch.argsort(theta.abs() if which == "LM" else theta, descending=True)[:k]
        done = len(alpha) < m or m >= min(n, max_iter)
        if not done:
            # residual of Ritz pair i: ‖H y_i − θ_i y_i‖ = β_next |S_{m,i}|
            res = (b_next * S[-1, order].abs()).cpu().numpy()
            done = bool(np.all(res <= tol * np.maximum(np.abs(theta[order].cpu().numpy()), 1e-30)))
        if done:
            return np.sort(theta[order].cpu().numpy())[::-1]
        m = min(2 * m, n, max_iter)  # restart with a longer run (simple and robust; cost is HVPs anyway)


def slq_nodes(
    matvec: MatVec, n: int, *, n_probes: int = 4, m: int = 64, seed: int = 0, device=None
) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes θ [n_probes, m'] and weights τ (rows sum to 1) from Rademacher unit probes."""
    g = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(n_probes):
        v = (torch.randint(0, 2, (n,), generator=g).double() * 2 - 1).to(device)
        alpha, beta, _, _ = lanczos(matvec, v, m)
        theta, S = torch.linalg.eigh(tridiag(alpha, beta))
        th, w = np.full(m, np.nan), np.zeros(m)
        th[: len(theta)], w[: len(theta)] = theta.cpu().numpy(), (S[0] ** 2).cpu().numpy()
        nodes.append(th)
        weights.append(w)
    return np.array(nodes), np.array(weights)


def slq_density(
    matvec: MatVec,
    n: int,
    *,
    n_probes: int = 4,
    m: int = 64,
    grid_points: int = 1024,
    sigma: float | None = None,
    seed: int = 0,
    device=None,
) -> dict:
    """Gaussian-broadened eigenvalue density on a grid.

    Returns {"grid": [G], "density": [G], "nodes", "weights", "sigma"}: ``grid`` spans the nodes ± 6σ,
    σ defaults to 1% of the node range, and ``density`` integrates to 1 (trapezoid rule on the grid)
    up to the Gaussian tails beyond ±6σ (< 1e-8).
    """
    nodes, weights = slq_nodes(matvec, n, n_probes=n_probes, m=m, seed=seed, device=device)
    ok = ~np.isnan(nodes)
    lo, hi = float(nodes[ok].min()), float(nodes[ok].max())
    if sigma is None:
        sigma = max(0.01 * (hi - lo), 1e-12 * max(abs(lo), abs(hi), 1.0))
    grid = np.linspace(lo - 6 * sigma, hi + 6 * sigma, grid_points)
    th, w = nodes[ok], weights[ok]
    dens = (w[None, :] * np.exp(-0.5 * ((grid[:, None] - th[None, :]) / sigma) ** 2)).sum(1)
    dens /= n_probes * sigma * np.sqrt(2 * np.pi)
    return {"grid": grid, "density": dens, "nodes": nodes, "weights": weights, "sigma": sigma}
