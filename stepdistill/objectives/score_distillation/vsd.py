"""VSD / SwiftBrush v1: image-free variational score distillation into a one-step student (Nguyen & Tran,
"SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score Distillation", CVPR 2024,
arXiv 2312.05239), with SNOOPI's PG-SB as a config choice (Nguyen et al., arXiv 2412.02687 §3.2:
`real_guidance_range`, the same random scale on the teacher and the LoRA teacher).

The student maps noise at t = 999 to x0; a LoRA teacher (the critic) learns the student's score; the generator
gradient is sigma_t^2 (eps_teacher^cfg - eps_lora^cfg), both guided with the same scale, without DMD's
normalization. Defaults are the official script's (VinAIResearch/SwiftBrush `train_swiftbrush.py` and its README
command): student lr 1e-6, LoRA lr 1e-3, Adam without weight decay, constant schedule, grad-norm clip 1, one LoRA
update per student update, guidance 4.5 on both, VSD timesteps in [20, 980], LoRA rank 64 / alpha 108 on to_q and
to_v, the LoRA trained with alpha_t^2-weighted eps MSE over all t with 10% null prompts; the student EMA is
`train.ema_decay` (the script's diffusers EMAModel default, 0.9999)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from stepdistill.objectives.score_distillation.base import ScoreDistillation, ScoreDistillationConfig
from stepdistill.objectives.score_distillation.gradients import surrogate_loss, variational_score_gradient
from stepdistill.teachers.base import Cond


@dataclass
class VSDConfig(ScoreDistillationConfig):
    name: str = "vsd"
    generator_lr: float = 1e-6
    critic_lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    critic_updates: int = 1
    real_guidance: float = 4.5
    min_step: float = 0.02
    max_step: float = 0.98
    critic: str = "lora"
    critic_lora_rank: int = 64
    critic_lora_alpha: float = 108.0
    critic_lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_v"])
    fake_guidance: str = "same"
    critic_null_prob: float = 0.1
    critic_weighting: str = "alpha2"
    vsd_weight: float = 1.0

    RANGES = {**ScoreDistillationConfig.RANGES, "vsd_weight": ">=0"}


class VSD(ScoreDistillation):
    name = "vsd"
    config_class = VSDConfig
    config: VSDConfig

    def variational_score_loss(self, x: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """SwiftBrush Eq. 5 at t ~ U[min_step, max_step] T on the noised detached sample."""
        c, schedule = self.config, self.teacher.schedule
        with torch.no_grad():
            t = schedule.sample_timesteps(x.shape[0], c.min_step, c.max_step, device=x.device)
            x_t = schedule.add_noise(x.detach(), torch.randn_like(x), t)
            alpha, sigma = schedule.alpha_sigma(t)
            grad = variational_score_gradient(*self.guided_x0(x_t, t, cond), alpha, sigma)
        return surrogate_loss(x, grad), grad

    def generator_loss(self, x: Tensor, cond: Cond, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        c = self.config
        loss_vsd, grad = self.variational_score_loss(x, cond)
        losses = {"vsd": loss_vsd, "vsd_grad_norm": grad.flatten(1).norm(dim=1).mean()}
        total = c.vsd_weight * loss_vsd
        if self.real is not None and c.gan_generator_weight > 0:
            losses["gan_g"] = self.gan_generator_loss(x, cond)
            total = total + c.gan_generator_weight * losses["gan_g"]
        losses["loss"] = total
        return losses
