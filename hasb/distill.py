"""Distillation for multi-precision / supernet training.

* ``"inplace"`` (default): within each step the highest-bit pass learns from the
  labels; its softmax (detached) becomes the soft target of the lower-bit passes:
  ``loss_b = (1 − w)·CE(z_b, y) + w·H(softmax(z_h), softmax(z_b))``.
* ``"pskd"`` (the paper's "KD", Kim et al. ICCV'21): every pass uses the soft target
  ``(1 − α_t)·onehot(y) + α_t·p_prev(x)`` with ``α_t = α_T·(e + 1)/E`` (α_T = 0.7),
  where ``p_prev(x)`` is the highest-bit softmax of that *training sample* from the
  previous epoch (one-hot at epoch 0).  The trainer stores it per sample index.
* ``"none"``: plain cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTILL_MODES = ("inplace", "pskd", "none")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of −Σ_c target_c · log softmax(logits)_c.  logits, target: [N, C]."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def pskd_alpha(epoch: int, epochs: int, alpha_T: float = 0.7) -> float:
    """α_t = α_T·(e + 1)/E for 0-based epoch e."""
    return float(alpha_T) * (epoch + 1) / max(int(epochs), 1)


def pskd_target(labels: torch.Tensor, p_prev: torch.Tensor | None, alpha: float, num_classes: int) -> torch.Tensor:
    """(1 − α)·onehot + α·p_prev; [N, C].  ``p_prev`` None (first epoch) → one-hot."""
    onehot = F.one_hot(labels, num_classes).float()
    if p_prev is None:
        return onehot
    return (1.0 - alpha) * onehot + alpha * p_prev.to(onehot)


def inplace_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, weight: float = 0.5
) -> torch.Tensor:
    """Label CE mixed with soft CE to the (detached) teacher probabilities; teacher None → CE only."""
    ce = F.cross_entropy(logits.float(), labels)
    if teacher is None or weight == 0:
        return ce
    return (1.0 - weight) * ce + weight * soft_cross_entropy(logits, teacher.detach())


__all__ = ["DISTILL_MODES", "soft_cross_entropy", "pskd_alpha", "pskd_target", "inplace_loss"]
