"""A small time- and class-conditional MLP: the backbone of students and critics for the analytic teacher."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of model timesteps (0..1000), as in DDPM / diffusers' Timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimeCondMLP(nn.Module):
    """f(x_t, t, class_labels) -> output of the same size as x_t. Class index `num_classes` is the null class."""

    def __init__(self, data_dim: int = 2, num_classes: int = 0, hidden: int = 256, depth: int = 4,
                 time_dim: int = 64) -> None:
        super().__init__()
        self.data_dim, self.num_classes, self.time_dim = data_dim, num_classes, time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        self.inp = nn.Linear(data_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth - 1)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, data_dim))

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h_cond = self.time_mlp(timestep_embedding(t, self.time_dim))
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            h_cond = h_cond + self.class_embed(class_labels)
        h = self.inp(x) + h_cond
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)
