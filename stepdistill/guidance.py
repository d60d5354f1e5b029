"""Classifier-free guidance: the standard-form combination of two model outputs, and guidance samplers (a fixed
scale, or a scale drawn per sample, as SNOOPI's PG-SB draws it)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def apply_guidance(out_uncond: Tensor, out_cond: Tensor, w: float | Tensor) -> Tensor:
    """Classifier-free guidance in the standard (Imagen / diffusers pipeline) form: uncond + w (cond - uncond).
    w = 1 is the conditional model; the LCM paper's omega equals w - 1."""
    if isinstance(w, Tensor) and w.ndim == 1:
        w = w.reshape(-1, *([1] * (out_cond.ndim - 1))).to(out_cond.dtype)
    return out_uncond + w * (out_cond - out_uncond)


@dataclass
class GuidanceSampler:
    """Guidance scales for a batch: `low` alone (low == high) is a fixed scale; low < high draws each sample's
    scale uniformly from [low, high]."""

    low: float
    high: float | None = None

    def __post_init__(self) -> None:
        if self.high is None:
            self.high = self.low
        if not 0.0 <= self.low <= self.high:
            raise ValueError(f"guidance range [{self.low}, {self.high}] must satisfy 0 <= low <= high")

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def __call__(self, n: int, device: torch.device | str = "cpu") -> float | Tensor:
        """A float for a fixed scale (one batched call, no per-sample broadcast), else a tensor [n]."""
        if self.fixed:
            return self.low
        return self.low + (self.high - self.low) * torch.rand(n, device=device)
