"""rCM: sCD regularized by distribution matching (Zheng et al. 2025, "Large Scale Diffusion Distillation via
Score-Regularized Continuous-Time Consistency", arXiv 2510.08431; official code NVlabs/rcm, whose defaults these
are: `rcm/models/t2v_model_distill_rcm.py`, `rcm/configs/experiments/rcm/wan2pt1_t2v.py`).

The forward-divergence sCD loss (scd.py, the paper's Eq. for the normalized tangent g) keeps diversity; a DMD
reverse-divergence term on the student's own samples is the "long-skip regularizer" that restores detail:
  L_student = lambda_sCM ||F_theta - F- - g||^2 / D + lambda_DMD ||G - sg(G - grad)||^2 / D
  G: the student's n-step rollout from pure noise, intermediate times min(t ~ p_D, previous time), fresh noise at
     each re-noising, gradient through the last step only; n cycles over 1 .. rollout_steps
  grad = (x0_fake(x_tD) - x0_teacher,CFG(x_tD)) / mean|G - x0_teacher,CFG|,   x_tD = cos t_D G + sin t_D z
  L_critic = ||(x0_fake(x_tD) - G) / sin t_D||^2 / D  (the fake score's TrigFlow-velocity MSE; G without gradient)
  p_D: sigma_d tan t_D = 5u / (1 - u), u ~ U[0, 1)  (rectified-flow-uniform time with shift 5)
Schedule: sCD alone for the first `tangent_warmup` steps (the same constant ramps the tangent), then one student
step (sCD and DMD together) every `student_update_freq` steps and the critic on the others. Both terms are means over
the elements here, the official code's sums over them; the ratio lambda_sCM : lambda_DMD = 100 : 1 is the same, but
as the normalized tangent g has unit norm per sample, the sCD term's share falls with the sample size D (the official
numbers are for Wan latents, D ~ 2M): on small samples lower lambda_sCM.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from stepdistill.objectives.base import OptimizerGroup, PlanHints
from stepdistill.objectives.continuous.scd import SCD, SCDConfig
from stepdistill.objectives.score_distillation.critic import (
    CRITIC_KINDS,
    Critic,
    build_fake_score,
    shared_base_rungs,
)
from stepdistill.schedules import _bcast
from stepdistill.teachers.base import Cond


@dataclass
class RCMConfig(SCDConfig):
    """Defaults: the official Wan2.1 1.3B config (lr, betas, weight decay, warm-up, loss scales, p_D, update ratio),
    sigma_d 1 (asserted there) and the sCM class default proposal (-0.8, 1.6); no adaptive or prior weight."""

    name: str = "rcm"
    lr: float = 2e-6
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.01
    sigma_d: float = 1.0
    p_mean: float = -0.8
    p_std: float = 1.6
    tangent_warmup: int = 1000  # sCD-only steps before the DMD term and the critic start (also the tangent ramp)
    adaptive_weight: bool = False
    prior_weight: bool = False
    guidance: float = 5.0  # the teacher's CFG in both terms
    scm_weight: float = 100.0  # lambda_sCM (the official loss_scale)
    dmd_weight: float = 1.0  # lambda_DMD (loss_scale_dmd; 0: pure sCD)
    dmd_shift: float = 5.0  # p_D's shift
    student_update_freq: int = 5  # after the warm-up: one student step per this many steps, the critic on the rest
    rollout_steps: int = 0  # the DMD rollout's most steps (0: the student's own number of steps)
    critic_lr: float = 4e-7
    critic: str = "full"  # full | lora | shared_base (score_distillation/critic.py)
    critic_lora_rank: int = 64

    CHOICES = {**SCDConfig.CHOICES, "critic": CRITIC_KINDS}
    RANGES = {**SCDConfig.RANGES, "scm_weight": ">=0", "dmd_weight": ">=0", "dmd_shift": ">0",
              "student_update_freq": ">=2", "rollout_steps": ">=0", "critic_lr": ">0", "critic_lora_rank": ">=1"}


class RCM(SCD):
    """sCD plus the DMD regularizer with its own fake-score critic."""

    name = "rcm"
    config_class = RCMConfig
    config: RCMConfig

    def __init__(self, teacher, generator, source, config: RCMConfig, data=None) -> None:
        super().__init__(teacher, generator, source, config, data)
        self.critic = Critic(teacher, build_fake_score(teacher, config.critic, config.critic_lora_rank),
                             with_head=False)

    @classmethod
    def shares_teacher_backbone(cls, config: RCMConfig) -> bool:
        return config.critic == "shared_base"

    @classmethod
    def plan_hints(cls, cfg) -> PlanHints:
        return PlanHints(rungs=shared_base_rungs(cfg))

    def optimizer_groups(self) -> list[OptimizerGroup]:
        c = self.config
        return [*super().optimizer_groups(),
                OptimizerGroup("critic", "critic", c.critic_lr, (c.betas[0], c.betas[1]), c.weight_decay,
                               max_grad_norm=c.max_grad_norm or None)]

    def regularized(self, step: int) -> bool:
        return self.config.dmd_weight > 0 and step >= self.config.tangent_warmup

    def phases(self, step: int) -> list[str]:
        """sCD (and its weighting) alone during the warm-up; then the student every `student_update_freq` steps,
        the critic on the others (the official `is_student_phase`)."""
        student = ["generator", "weighting"] if self.weighting is not None else ["generator"]
        if not self.regularized(step) or (step - self.config.tangent_warmup) % self.config.student_update_freq == 0:
            return student
        return ["critic"]

    def trace_phase(self, phase: str, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.critic(x, t, cond.fields)[0] if phase == "critic" else super().trace_phase(phase, x, t, cond)

    # ------------------------------------------------------------------ the DMD regularizer
    def dmd_times(self, n: int) -> Tensor:
        """t_D ~ p_D: sigma_d tan t_D = shift u / (1 - u), within the teacher's times (float64)."""
        u = torch.rand(n, dtype=torch.float64)
        ratio = self.config.dmd_shift * u / (1 - u)
        return torch.atan(ratio / self.config.sigma_d).clamp(*self.time_range).to(self.device)

    def x0(self, velocity, x_s: Tensor, s: Tensor) -> Tensor:
        """f(x_s, s) = cos s x_s - sin s sigma_d F of a velocity (x_s, s) -> sigma_d F."""
        return self.teacher.schedule.trigflow_x0(velocity(x_s, s), x_s, s)

    def rollout(self, cond: Cond, n: int, with_grad: bool) -> Tensor:
        """The student's n-step sample from pure noise at the top time, each intermediate time min(t ~ p_D,
        previous time) with fresh noise, the gradient (if any) through the last step only."""
        sigma_d, top = self.config.sigma_d, self.time_range[1]
        F = self.student_velocity(cond.fields)
        s = torch.full((len(cond),), top, dtype=torch.float64, device=self.device)
        z = self.noise(len(cond))
        x_s = _bcast(s.sin(), z) * sigma_d * z
        for k in range(n):
            last = k == n - 1
            with torch.set_grad_enabled(with_grad and last):
                x0 = self.x0(F, x_s.float(), s)
            if last:
                return x0
            s = torch.minimum(self.dmd_times(len(cond)), s)
            x_s = _bcast(s.cos(), x0) * x0.detach() + _bcast(s.sin(), x0) * sigma_d * torch.randn_like(x0)
        raise ValueError(f"a rollout needs at least one step, got n={n}")

    def rollout_length(self, step: int) -> int:
        """n, cycling over 1 .. rollout_steps (the official code cycles the same way over its updates)."""
        most = self.config.rollout_steps or self.generator.num_steps
        return step % most + 1

    def noised(self, G: Tensor) -> tuple[Tensor, Tensor]:
        t = self.dmd_times(G.shape[0])
        z = self.config.sigma_d * torch.randn_like(G)
        return (_bcast(t.cos(), G) * G + _bcast(t.sin(), G) * z).float(), t

    def fake_velocity(self, fields: dict[str, Tensor]):
        return self.velocity(lambda x, tau: self.critic(x, tau, fields, full_precision=True)[0], None)

    def dmd_loss(self, G: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """||G - sg(G - grad)||^2 / D with the normalized DMD gradient (the fake score conditional, the teacher
        guided)."""
        with torch.no_grad():
            x_t, t = self.noised(G.detach())
            x0_teacher = self.teacher.schedule.trigflow_x0(self.teacher_velocity(x_t, t, cond), x_t, t)
            x0_fake = self.x0(self.fake_velocity(cond.fields), x_t, t)
            dims = tuple(range(1, G.ndim))
            scale = (G.detach().double() - x0_teacher).abs().mean(dims, keepdim=True).clamp_min(1e-5)
            grad = (x0_fake - x0_teacher) / scale
        target = (G.double() - grad).detach()
        return (G.double() - target).square().mean(dims).mean(), grad

    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        if phase == "critic":
            return self.critic_loss(batch, step)
        losses = super().loss(phase, batch, step)
        if phase != "generator":
            return losses
        c = self.config
        losses["scd"] = losses["loss"]
        total = c.scm_weight * losses["loss"]
        if self.regularized(step):
            cond = self.source.encode(batch["cond_index"]).to(self.device)
            G = self.rollout(cond, self.rollout_length(step // c.student_update_freq), with_grad=True)
            losses["dmd"], grad = self.dmd_loss(G, cond)
            losses["dmd_grad_norm"] = grad.flatten(1).norm(dim=1).mean()
            total = total + c.dmd_weight * losses["dmd"]
        losses["loss"] = total.float()
        return {k: v.float() for k, v in losses.items()}

    def critic_loss(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """The fake score's denoising loss on the student's rollouts, ||(x0_fake - G) / sin t_D||^2 / D."""
        cond = self.source.encode(batch["cond_index"]).to(self.device)
        with torch.no_grad():
            G = self.rollout(cond, self.rollout_length(step), with_grad=False)
        x_t, t = self.noised(G)
        x0_fake = self.x0(self.fake_velocity(cond.fields), x_t, t)
        dims = tuple(range(1, G.ndim))
        loss = ((x0_fake - G.double()) / _bcast(t.sin(), G)).square().mean(dims).mean()
        return {"loss": loss.float()}
