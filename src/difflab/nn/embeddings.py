"""Time and context embeddings. Shapes: t (B,), context (B, K) -> (B, emb_dim)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    # emb = [sin(t w_i), cos(t w_i)], w_i = max_period^(-i / (dim/2)), i = 0..dim/2-1  (Vaswani et al.)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t, then an MLP: (B,) -> (B, emb_dim)."""

    def __init__(self, base_dim: int, emb_dim: int) -> None:
        super().__init__()
        self.base_dim = base_dim
        self.mlp = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: Tensor) -> Tensor:
        features = sinusoidal_embedding(t, self.base_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ContextEmbedding(nn.Module):
    """A context vector (one-hot, multi-hot or a mix such as 1.0 hero + 0.6 food) -> (B, emb_dim).

    Rows whose ``keep`` flag is False get the learned null embedding instead: classifier-free
    guidance's unconditional branch, trained by context dropout.
    """

    def __init__(self, num_classes: int, emb_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.mlp = nn.Sequential(nn.Linear(num_classes, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.null = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, context: Tensor | None, keep: Tensor | None, batch: int) -> Tensor:
        if context is None:
            return self.null.expand(batch, -1)
        if context.shape[-1] != self.num_classes:
            raise ValueError(f"context has {context.shape[-1]} entries, the model was built for {self.num_classes} classes")
        emb = self.mlp(context.to(self.null.dtype))
        if keep is None:
            return emb
        return torch.where(keep[:, None], emb, self.null.to(emb.dtype).expand_as(emb))
