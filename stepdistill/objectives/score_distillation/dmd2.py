"""DMD2: distribution matching distillation with a fake-score critic, a GAN head, two time-scale updates and
backward simulation (Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis",
NeurIPS 2024, arXiv 2405.14867), computed as the official code (tianweiy/DMD2) computes it.

Defaults follow the paper's SD1.5 recipe (Table/§5 and `experiments/sdv1.5/*.sh`): lr 1e-5, AdamW (0.9, 0.999)
weight decay 0.01, grad-norm clip 10, 10 critic updates per generator update, real guidance 1.75, DM timesteps
in [0.02, 0.98] of T, GAN weights 1e-3 (generator) / 1e-2 (critic).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from stepdistill.config.schema import PairsConfig
from stepdistill.data import PairDataset, generate_pairs
from stepdistill.objectives.base import reconstruction_loss
from stepdistill.objectives.score_distillation.base import ScoreDistillation, ScoreDistillationConfig
from stepdistill.objectives.score_distillation.gradients import distribution_matching_gradient, surrogate_loss
from stepdistill.teachers.base import Cond


@dataclass
class DMD2Config(ScoreDistillationConfig):
    name: str = "dmd2"
    dm_weight: float = 1.0
    regression_weight: float = 0.0  # optional DMD v1 L_reg on cached teacher pairs (0: off)
    pairs: PairsConfig = field(default_factory=PairsConfig)  # regression_weight > 0: the cached teacher pairs

    RANGES = {**ScoreDistillationConfig.RANGES, "dm_weight": ">=0", "regression_weight": ">=0"}


class DMD2(ScoreDistillation):
    name = "dmd2"
    config_class = DMD2Config
    config: DMD2Config

    def prepare_data(self, output_dir, device) -> None:
        super().prepare_data(output_dir, device)
        if self.config.regression_weight > 0:
            self._pairs = PairDataset(generate_pairs(self.teacher, self.source, self.config.pairs, output_dir,
                                                     device))

    def distribution_matching_loss(self, x: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """DMD Eq. 7 at t ~ U[min_step, max_step] T on the noised detached sample, real score guided."""
        c, schedule = self.config, self.teacher.schedule
        with torch.no_grad():
            t = schedule.sample_timesteps(x.shape[0], c.min_step, c.max_step, device=x.device)
            x_t = schedule.add_noise(x.detach(), torch.randn_like(x), t)
            grad = distribution_matching_gradient(x, *self.guided_x0(x_t, t, cond))
        return surrogate_loss(x, grad), grad

    def generator_loss(self, x: Tensor, cond: Cond, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        c = self.config
        loss_dm, grad = self.distribution_matching_loss(x, cond)
        losses = {"dm": loss_dm, "dm_grad_norm": grad.flatten(1).norm(dim=1).mean()}
        total = c.dm_weight * loss_dm
        if self.real is not None and c.gan_generator_weight > 0:
            losses["gan_g"] = self.gan_generator_loss(x, cond)
            total = total + c.gan_generator_weight * losses["gan_g"]
        if c.regression_weight > 0:
            losses["regression"] = self.regression_loss(x.shape[0])
            total = total + c.regression_weight * losses["regression"]
        losses["loss"] = total
        return losses

    def regression_loss(self, n: int) -> Tensor:
        """DMD v1's L_reg: the one-step student from cached noise regresses onto the teacher's ODE endpoint."""
        idx = torch.randint(0, len(self._pairs), (n,))
        pair = {k: v[idx] for k, v in self._pairs.tensors.items()}
        cond = self.source.encode(pair["cond_index"]).to(self.device)
        noise = pair["noise"].to(self.device)
        x0 = self.generator(noise, cond, self.generator.time(0, noise))
        return reconstruction_loss(x0, pair["x0"].to(self.device), "l2", 0.0)
