"""SiD: Score identity Distillation (Zhou et al., "Score identity Distillation: Exponentially Fast Distillation
of Pretrained Diffusion Models for One-Step Generation", ICML 2024, arXiv 2404.04057), data-free: the fake score
learns the generator's samples and the generator minimizes the alpha-weighted loss of §4, differentiating through
both scores. Guided for text (SiD-LSG, Zhou et al., ICLR 2025, arXiv 2406.01561: kappa_1 on the fake score's own
loss = `critic_guidance`, kappa_2..4 on both scores in the generator loss = `real_guidance` with
`fake_guidance: same`), and adversarial with `real_data` (SiDA, Zhou et al., ICLR 2025, arXiv 2410.14919), whose
GAN term is DMD2's head on the fake score's bottleneck.

Defaults are the official SD1.5 SiD-LSG script's (mingyuanzhou/SiD-LSG `run_sid.sh`, `sid_train.py`): alpha 1,
lr 1e-6 for both networks, Adam betas (0, 0.999) without weight decay, no gradient clipping (fp32), one fake-score
update per generator update, timesteps in [20, 980), guidance 1.5 for kappa_1..4 (the COCO FID 8.15 model), 10%
null prompts in the fake score's loss when it is guided."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from stepdistill.objectives.base import OptimizerGroup
from stepdistill.objectives.score_distillation.base import ScoreDistillation, ScoreDistillationConfig
from stepdistill.objectives.score_distillation.critic import frozen
from stepdistill.objectives.score_distillation.gradients import score_identity_loss
from stepdistill.teachers.base import Cond


@dataclass
class SiDConfig(ScoreDistillationConfig):
    name: str = "sid"
    alpha: float = 1.0  # SiD's loss weight: 1.2 in the EDM scripts, 1.0 in SiD-LSG and SiDA
    beta1: float = 0.0  # Adam's first-moment decay for both networks (the official scripts' betas (0, 0.999))
    generator_lr: float = 1e-6
    critic_lr: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    critic_updates: int = 1
    real_guidance: float = 1.5
    min_step: float = 0.02
    max_step: float = 0.98
    fake_guidance: str = "same"
    critic_guidance: float = 1.5
    critic_null_prob: float = 0.1
    sid_weight: float = 1.0

    RANGES = {**ScoreDistillationConfig.RANGES, "beta1": "[0,1)", "sid_weight": ">=0"}


class SiD(ScoreDistillation):
    name = "sid"
    config_class = SiDConfig
    config: SiDConfig

    def optimizer_groups(self) -> list[OptimizerGroup]:
        return [replace(g, betas=(self.config.beta1, 0.999)) for g in super().optimizer_groups()]

    def score_identity_terms(self, x: Tensor, cond: Cond) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, x0_real, x0_fake) at t ~ U[min_step, max_step] T: the sample x is noised WITH its graph, and both
        scores run with gradient to their input (the critic's weights frozen for this pass)."""
        c, schedule = self.config, self.teacher.schedule
        t = schedule.sample_timesteps(x.shape[0], c.min_step, c.max_step, device=x.device)
        x_t = schedule.add_noise(x, torch.randn_like(x), t)
        with frozen(self.critic):
            x0_real, x0_fake = self.guided_x0(x_t, t, cond)
        return x_t, x0_real, x0_fake

    def generator_loss(self, x: Tensor, cond: Cond, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        c = self.config
        _, x0_real, x0_fake = self.score_identity_terms(x, cond)
        loss_sid = score_identity_loss(x, x0_real, x0_fake, c.alpha)
        losses = {"sid": loss_sid, "score_gap": (x0_real - x0_fake).detach().flatten(1).norm(dim=1).mean().float()}
        total = c.sid_weight * loss_sid
        if self.real is not None and c.gan_generator_weight > 0:
            losses["gan_g"] = self.gan_generator_loss(x, cond)
            total = total + c.gan_generator_weight * losses["gan_g"]
        losses["loss"] = total
        return losses
