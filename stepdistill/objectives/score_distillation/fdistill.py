"""f-distill: distribution matching under an f-divergence (Xu, Nie, Vahdat, "One-step Diffusion Models with
f-Divergence Distribution Matching", arXiv 2502.15681), on DMD2's machinery.

The gradient of D_f(p || q_theta) with respect to the generator is DMD's score difference weighted per sample by
h(r) = f''(r) r^2 with r = p_t(x_t) / q_t(x_t), the teacher's density over the student's at the noised sample
(the paper's Theorem 1 / Eq. 8); reverse KL, f(r) = -log r, gives h = 1: DMD2 itself. r is read off the GAN
discriminator, whose logit estimates log p_t / q_t (real = 1 in the non-saturating loss: D = sigmoid(logit), so
r = D / (1 - D) = exp(logit)). Two normalizations keep the weights' scale fixed (§4.2): r is divided by a running
mean per timestep bin and h by its batch mean. Defaults are FastGen's f_distill (NVlabs/FastGen,
`distribution_matching/f_distill.py`): JS, logits clamped to +-10, r clipped to [0.1, 20], 10 timestep bins, EMA
rate 0 (the bin's mean in this batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from stepdistill.config.schema import ConfigError
from stepdistill.objectives.base import PlanHints
from stepdistill.objectives.score_distillation.critic import frozen, shared_base_rungs
from stepdistill.objectives.score_distillation.dmd2 import DMD2, DMD2Config
from stepdistill.objectives.score_distillation.gradients import distribution_matching_gradient, surrogate_loss
from stepdistill.teachers.base import Cond

# h(r) = f''(r) r^2 for each divergence (the paper's Table 1)
WEIGHTINGS = {
    "rkl": lambda r: torch.ones_like(r),  # reverse KL: DMD / DMD2
    "kl": lambda r: r,  # forward KL
    "js": lambda r: r / (1 + r),  # Jensen-Shannon
    "sf": lambda r: 1 / (1 + r),  # softened reverse KL
    "neyman": lambda r: 1 / r,  # Neyman chi^2
    "sh": lambda r: r.sqrt(),  # squared Hellinger
    "jf": lambda r: 1 + r,  # Jeffreys
}
LOGIT_CLAMP = 10.0
RATIO_RANGE = (0.1, 20.0)


def density_ratio(logit: Tensor) -> Tensor:
    """r = p / q from discriminator logits (real = 1): exp(logit), clamped as FastGen does."""
    return logit.clamp(-LOGIT_CLAMP, LOGIT_CLAMP).exp().clamp(*RATIO_RANGE)


def normalized_weights(r: Tensor, divergence: str, bins: Tensor, bin_means: Tensor) -> Tensor:
    """h(r / mean of r in its timestep bin) / batch mean of h: the per-sample weights on the DM gradient (§4.2).
    `bins` [B] index `bin_means` [num_bins], the running mean of r per bin."""
    h = WEIGHTINGS[divergence](r / bin_means[bins].clamp_min(1e-8))
    return h / h.mean().clamp_min(1e-8)


@dataclass
class FDistillConfig(DMD2Config):
    name: str = "fdistill"
    divergence: str = "js"
    ratio_bins: int = 10  # timestep bins of the ratio's running mean
    ratio_ema: float = 0.0  # its EMA rate per update (0: the bin's mean in this batch; FastGen's ImageNet-64 0.5)

    CHOICES = {**DMD2Config.CHOICES, "divergence": tuple(WEIGHTINGS)}
    RANGES = {**DMD2Config.RANGES, "ratio_bins": ">=1", "ratio_ema": "[0,1)"}


class FDistill(DMD2):
    name = "fdistill"
    config_class = FDistillConfig
    config: FDistillConfig

    def __init__(self, teacher, generator, source, config: FDistillConfig, data=None) -> None:
        if not config.real_data:
            raise ConfigError("f-distill reads the density ratio p/q off the GAN discriminator, which needs real "
                              "samples: set objective.real_data (mixture for the analytic teacher; images with "
                              "data.image_dir for image teachers), or use objective.name=dmd2")
        super().__init__(teacher, generator, source, config, data)
        # running mean of r per timestep bin (a buffer of the critic: checkpointed and moved with it)
        self.critic.register_buffer("ratio_means", torch.ones(config.ratio_bins))

    @classmethod
    def plan_hints(cls, cfg) -> PlanHints:
        return PlanHints(rungs=shared_base_rungs(cfg))  # the GAN head stays: f-distill cannot run without it

    def timestep_bins(self, t: Tensor) -> Tensor:
        T = float(self.teacher.schedule.num_train_timesteps)
        return (t.float() / T * self.config.ratio_bins).long().clamp(0, self.config.ratio_bins - 1)

    @torch.no_grad()
    def update_ratio_means(self, r: Tensor, bins: Tensor) -> Tensor:
        """The running mean of r per bin after this batch (bins without samples keep theirs)."""
        means = self.critic.ratio_means
        n = self.config.ratio_bins
        counts = torch.bincount(bins, minlength=n).to(r.dtype)
        batch = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, bins, r) / counts.clamp_min(1)
        rate = self.config.ratio_ema
        means.copy_(torch.where(counts > 0, rate * means + (1 - rate) * batch, means))
        return means

    def distribution_matching_loss(self, x: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """DMD Eq. 7 at DMD2's noised sample, weighted per sample by h(r) of the discriminator's ratio there."""
        c, schedule = self.config, self.teacher.schedule
        with torch.no_grad(), frozen(self.critic):
            t = schedule.sample_timesteps(x.shape[0], c.min_step, c.max_step, device=x.device)
            x_t = schedule.add_noise(x.detach(), torch.randn_like(x), t)
            grad = distribution_matching_gradient(x, *self.guided_x0(x_t, t, cond))
            _, logit = self.critic(x_t, t, self.gan_fields(cond), classify=True)
            r = density_ratio(logit.float())
            bins = self.timestep_bins(t)
            weights = normalized_weights(r, c.divergence, bins, self.update_ratio_means(r, bins))
            grad = grad * weights.reshape(-1, *([1] * (x.ndim - 1)))
        self._ratio_log = {"ratio": r.mean(), "weight_max": weights.max()}
        return surrogate_loss(x, grad), grad

    def generator_loss(self, x: Tensor, cond: Cond, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        losses = super().generator_loss(x, cond, batch)
        return {**losses, **self._ratio_log}
