"""A byte-level decoder-only transformer: every projection an ``nn.Linear``, so every one is quantizable.

Input: byte ids ``[N, T]`` (uint8 or int64, T ≤ ``context``); output: next-byte logits ``[N, T, 256]``.
Pre-LN blocks: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``; causal self-attention with separate q, k, v and
output projections (four Linears, so a bit search can treat keys, values and queries differently); a GELU MLP
of width 4·d; learned positional embedding; a final LayerNorm; an **untied** output head (its own Linear: a
head tied to the embedding would share one tensor between an unquantized lookup and a quantized matmul).

Attention is written out (matmul, mask, softmax) rather than ``scaled_dot_product_attention``: its fused CPU/GPU
kernels are not twice differentiable, and the sensitivity stage takes Hessian-vector products through it.

In the zoo (``build_model("lm_tiny")``) the vision arguments are ignored: the vocabulary is always 256 bytes
(``num_classes`` is not the vocabulary), ``in_channels``/``image_size`` mean nothing here, and the context length
is the model's own ``context`` argument (``build_model("lm_small", context=512)``); a data source's windows must
not be longer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 256


def bits_per_byte(loss_nats):
    """Mean next-byte cross-entropy in nats → bits per byte (``loss / ln 2``); floats or tensors."""
    return loss_nats / math.log(2)


def next_byte_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in nats per byte of logits ``[N, T, 256]`` against byte targets ``[N, T]``."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.reshape(-1).long(), reduction=reduction)


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, context: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"width {d} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.register_buffer("mask", torch.ones(context, context, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.heads

        def split(z):  # [N, T, d] → [N, h, T, d/h]
            return z.view(n, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, context: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, context)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteLM(nn.Module):
    """Decoder-only byte LM: ``[N, T]`` byte ids → ``[N, T, 256]`` next-byte logits."""

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads, context) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self._init(layers)
        self.example_input_shape = (context,)

    def _init(self, layers: int) -> None:
        # GPT-2's scheme: N(0, 0.02), residual output projections shrunk by 1/sqrt(2·layers) so the residual
        # stream's variance does not grow with depth; logits then start near 0 and the loss near ln 256
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("o.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def example_input(self, batch: int = 2) -> torch.Tensor:
        """A batch of random byte ids ``[batch, context]`` (int64) on the model's device, for tracing."""
        return torch.randint(0, VOCAB, (batch, self.context), device=self.pos.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype.is_floating_point:
            raise ValueError(f"ByteLM takes byte ids [N, T] (uint8 or int64), got {tuple(x.shape)} {x.dtype}")
        t = x.shape[1]
        if t > self.context:
            raise ValueError(f"input of {t} bytes is longer than the model's context of {self.context}")
        h = self.tok(x.long()) + self.pos.weight[:t]
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln_f(h))


def lm_tiny(context: int = 64, **_) -> ByteLM:
    """d=64, 2 layers, 4 heads, context 64: ~0.13 M parameters, for CPU tests."""
    return ByteLM(d=64, layers=2, heads=4, context=context)


def lm_small(context: int = 256, **_) -> ByteLM:
    """d=384, 6 layers, 6 heads, context 256: ~10.9 M parameters, for one GPU."""
    return ByteLM(d=384, layers=6, heads=6, context=context)
