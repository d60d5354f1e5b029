"""Classifier-free guidance: the standard-form combination of two model outputs, and guidance samplers (a fixed
scale, or a scale drawn uniformly per sample or per batch, as SNOOPI's PG-SB draws it)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

GUIDANCE_DRAWS = ("sample", "batch")


def apply_guidance(out_uncond: Tensor, out_cond: Tensor, w: float | Tensor) -> Tensor:
    """Classifier-free guidance in the standard (Imagen / diffusers pipeline) form: uncond + w (cond - uncond).
    w = 1 is the conditional model; the LCM paper's omega equals w - 1."""
    if isinstance(w, Tensor) and w.ndim == 1:
        w = w.reshape(-1, *([1] * (out_cond.ndim - 1))).to(out_cond.dtype)
    return out_uncond + w * (out_cond - out_uncond)


@dataclass
class GuidanceSampler:
    """Guidance scales for a batch: `low` alone (low == high) is a fixed scale; low < high draws scales uniformly
    from [low, high], one per sample (`per="sample"`) or one for the whole batch (`per="batch"`)."""

    low: float
    high: float | None = None
    per: str = "sample"

    def __post_init__(self) -> None:
        if self.high is None:
            self.high = self.low
        if not 0.0 <= self.low <= self.high:
            raise ValueError(f"guidance range [{self.low}, {self.high}] must satisfy 0 <= low <= high")
        if self.per not in GUIDANCE_DRAWS:
            raise ValueError(f"guidance draw {self.per!r} is not one of {GUIDANCE_DRAWS}")

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def __call__(self, n: int, device: torch.device | str = "cpu") -> float | Tensor:
        """A float for a fixed scale (one batched call, no per-sample broadcast), else a tensor [n]."""
        if self.fixed:
            return self.low
        u = torch.rand(n if self.per == "sample" else 1, device=device).expand(n)
        return self.low + (self.high - self.low) * u
