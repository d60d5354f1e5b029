"""An exact analytic teacher: the posterior mean of a (class-conditional) isotropic Gaussian mixture.

For x0 ~ sum_k w_k N(mu_k, s_k^2 I) and x_t = alpha x0 + sigma eps, x_t is itself a mixture
sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I), and
E[x0 | x_t] = sum_k r_k(x_t) [mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k)],
with r_k the responsibilities. Exact for any (alpha, sigma): VP and flow schedules alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import math

import torch
from torch import Tensor, nn

from stepdistill.mlp import TimeCondMLP
from stepdistill.schedules import NoiseSchedule
from stepdistill.teachers.base import Cond, Teacher


@dataclass
class GaussianMixture:
    means: Tensor  # [K, D]
    stds: Tensor  # [K]
    class_weights: Tensor  # [C, K]; rows sum to 1; C = 1 for an unconditional mixture
    conditional: bool = False

    @classmethod
    def ring(cls, num_modes: int = 8, radius: float = 1.0, std: float = 0.1, num_classes: int = 0,
             own_weight: float = 0.25) -> "GaussianMixture":
        """`num_modes` modes on a circle. With `num_classes` = C > 0, class c gives each of its num_modes/C
        consecutive "own" modes weight `own_weight` and spreads the rest evenly over the others, so that the
        classes overlap and classifier-free guidance visibly moves mass between modes."""
        angles = torch.arange(num_modes, dtype=torch.float64) * 2 * math.pi / num_modes
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        stds = torch.full((num_modes,), std, dtype=torch.float64)
        if num_classes <= 0:
            return cls(means, stds, torch.full((1, num_modes), 1.0 / num_modes, dtype=torch.float64))
        if num_modes % num_classes:
            raise ValueError(f"num_modes ({num_modes}) must be a multiple of num_classes ({num_classes})")
        per_class = num_modes // num_classes
        if not 0 < own_weight * per_class <= 1:
            raise ValueError(f"own_weight {own_weight} x {per_class} own modes must lie in (0, 1]")
        rest = (1 - own_weight * per_class) / (num_modes - per_class) if num_modes > per_class else 0.0
        weights = torch.full((num_classes, num_modes), rest, dtype=torch.float64)
        for c in range(num_classes):
            weights[c, c * per_class:(c + 1) * per_class] = own_weight
        return cls(means, stds, weights, conditional=True)

    @property
    def num_classes(self) -> int:
        return self.class_weights.shape[0] if self.conditional else 0

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def weights_for(self, labels: Tensor | None, n: int) -> Tensor:
        """Mixture weights [n, K] for class labels; the null class (index C) or None gives the marginal."""
        marginal = self.class_weights.mean(0)
        if labels is None or not self.conditional:
            return marginal.expand(n, -1)
        table = torch.cat([self.class_weights, marginal[None]]).to(labels.device)
        return table[labels]

    def sample(self, n: int, labels: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        w = self.weights_for(labels, n)
        comp = torch.multinomial(w.cpu(), 1, generator=generator).squeeze(1)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.stds[comp, None] * noise).to(torch.float32)

    def posterior_mean(self, x_t: Tensor, alpha: Tensor, sigma: Tensor, weights: Tensor) -> Tensor:
        """E[x0 | x_t] in float64; alpha, sigma are [B], weights [B, K]."""
        x = x_t.to(torch.float64)
        mu, s2 = self.means.to(x.device), (self.stds**2).to(x.device)
        a, sg = alpha[:, None], sigma[:, None]  # [B, 1]
        var = a * a * s2[None] + sg * sg  # [B, K]
        diff = x[:, None, :] - a[..., None] * mu[None]  # [B, K, D]
        log_r = weights.to(x.device).log() - 0.5 * (diff**2).sum(-1) / var - 0.5 * self.dim * var.log()
        r = log_r.softmax(dim=1)
        comp_mean = mu[None] + (a * s2[None] / var)[..., None] * diff
        return (r[..., None] * comp_mean).sum(1)


class GMMTeacher(Teacher):
    """Exact eps-prediction teacher for a Gaussian mixture under a VP (default: SD's) or flow schedule."""

    def __init__(self, mixture: GaussianMixture | None = None, schedule: NoiseSchedule | None = None,
                 backbone_hidden: int = 256, backbone_depth: int = 4) -> None:
        self.mixture = mixture or GaussianMixture.ring()
        self.schedule = schedule or NoiseSchedule.vp()
        self.sample_shape = (self.mixture.dim,)
        self.backbone_hidden, self.backbone_depth = backbone_hidden, backbone_depth

    @property
    def num_classes(self) -> int:
        return self.mixture.num_classes

    def encode(self, prompts: Sequence | Tensor, cache: bool = True) -> Cond:
        labels = torch.as_tensor(prompts, dtype=torch.long)
        if not self.num_classes:
            return Cond({}, {}, len(labels))
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}), got {labels.tolist()[:8]}...")
        return Cond({"class_labels": labels}, {"class_labels": torch.full_like(labels, self.num_classes)},
                    len(labels))

    def model_output(self, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> Tensor:
        alpha, sigma = self.schedule.alpha_sigma(torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0]))
        weights = self.mixture.weights_for(fields.get("class_labels"), x_t.shape[0])
        x0 = self.mixture.posterior_mean(x_t, alpha, sigma, weights)
        eps = (x_t.to(torch.float64) - alpha[:, None] * x0) / sigma[:, None]
        out = self.schedule.from_x0_eps(x0, eps, t)
        return out.to(torch.float32)

    def call(self, net: nn.Module, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> Tensor:
        return net(x_t, t, **fields).to(torch.float32)

    def build_backbone(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return TimeCondMLP(self.mixture.dim, self.num_classes, self.backbone_hidden, self.backbone_depth).to(dtype)

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Class labels drawn uniformly (zeros for an unconditional mixture)."""
        if not self.num_classes:
            return torch.zeros(n, dtype=torch.long)
        return torch.randint(0, self.num_classes, (n,), generator=generator)
