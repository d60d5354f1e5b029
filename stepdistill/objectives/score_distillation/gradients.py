"""Score-distillation gradients with respect to a generator sample x, and the surrogate loss that backpropagates
one: loss = 0.5 ||x - sg(x - grad)||^2 / numel has d loss / dx = grad / numel, the form the official DMD2 code
uses (and SwiftBrush's `grad * latents` surrogate up to that constant)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def distribution_matching_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD Eq. 7 with DMD2's per-sample normalization, in the official code's form (float64):
    grad = (p_real - p_fake) / mean_{CHW}|p_real| with p = x - x0_hat, i.e. (x0_fake - x0_real) / mean|x - x0_real|:
    descent moves x toward the real score's x0 and away from the fake one's. Non-finite entries become 0."""
    xd = x.detach().double()
    p_real, p_fake = xd - x0_real.double(), xd - x0_fake.double()
    norm = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num((p_real - p_fake) / norm).float()


def surrogate_loss(x: Tensor, grad: Tensor) -> Tensor:
    """0.5 mean((x - sg(x - grad))^2): its gradient with respect to x is grad / x.numel()."""
    return 0.5 * F.mse_loss(x.float(), (x.float() - grad).detach())
