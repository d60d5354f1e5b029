"""Score-distillation gradients with respect to a generator sample x, and the surrogate loss that backpropagates
one: loss = 0.5 ||x - sg(x - grad)||^2 / numel has d loss / dx = grad / numel, the form the official DMD2 code
uses (and SwiftBrush's `grad * latents` surrogate up to that constant). SiD's loss is not a fixed gradient: it
differentiates through both scores, so it is a loss here (`score_identity_loss`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample value [B] shaped to broadcast against x [B, ...]."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def distribution_matching_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD Eq. 7 with DMD2's per-sample normalization, in the official code's form (float64):
    grad = (p_real - p_fake) / mean_{CHW}|p_real| with p = x - x0_hat, i.e. (x0_fake - x0_real) / mean|x - x0_real|:
    descent moves x toward the real score's x0 and away from the fake one's. Non-finite entries become 0."""
    xd = x.detach().double()
    p_real, p_fake = xd - x0_real.double(), xd - x0_fake.double()
    norm = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num((p_real - p_fake) / norm).float()


def variational_score_gradient(x0_real: Tensor, x0_fake: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """VSD (ProlificDreamer Eq. 9, SwiftBrush Eq. 5) with w(t) = sigma_t^2 and no normalization:
    grad = sigma_t^2 (eps_real - eps_fake). With eps = (x_t - alpha_t x0) / sigma_t this is
    alpha_t sigma_t (x0_fake - x0_real), computed from the x0 estimates in float64; alpha, sigma are [B].
    Descent moves x toward the real score's x0, as with DMD; non-finite entries become 0 (the official code's
    nan_to_num)."""
    scale = _per_sample(alpha.double() * sigma.double(), x0_real)
    return torch.nan_to_num(scale * (x0_fake.double() - x0_real.double())).float()


def surrogate_loss(x: Tensor, grad: Tensor) -> Tensor:
    """0.5 mean((x - sg(x - grad))^2): its gradient with respect to x is grad / x.numel()."""
    return 0.5 * F.mse_loss(x.float(), (x.float() - grad).detach())


def score_identity_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor, alpha: float) -> Tensor:
    """SiD's generator loss (Zhou et al. 2024 §4, L = (1 - alpha) L1 + L2, in the official code's form):
    per element (f_real - f_fake) * ((f_real - x) - alpha (f_real - f_fake)) / mean_{CHW}|x - f_real|, summed over
    a sample's elements and averaged over the batch. f_real and f_fake are the two scores' x0 estimates at
    x_t = a_t x + s_t eps, both computed WITH the graph back to x (the generator gradient flows through both
    networks' inputs); the normalization is a constant. alpha = 1 gives (f_real - f_fake) . (f_fake - x)."""
    xd = x.double()
    with torch.no_grad():
        weight = (xd - x0_real.double()).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True).clamp_min(1e-5)
    diff = x0_real.double() - x0_fake.double()
    loss = diff * ((x0_real.double() - xd) - alpha * diff) / weight
    return loss.flatten(1).sum(1).mean().float()
