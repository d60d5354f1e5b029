"""MeanFlow distillation (Geng et al., arXiv 2505.13447) from a flow or VP teacher: the average-velocity student
u_theta(z, r, t) (meanflow_student.py) trained with the MeanFlow identity, the instantaneous velocity taken from the
teacher instead of the data pair (FastGen `consistency_model/mean_flow.py`, use_cd). A VP teacher is read at the
same (x, eps) through schedules.py's TrigFlow view.

In the package's flow convention (z_t = (1 - t) x + t eps, t = 1 at noise, v = eps - x, network time T t):
  u(z_t, r, t) = 1/(t - r) int_r^t v(z_tau, tau) dtau                 (MeanFlow §4.1, the average velocity)
  u = v - (t - r) du/dt,  du/dt = d_z u v + d_r u 0 + d_t u 1           (§4.1, the MeanFlow identity)
  (t, r): logit-normal each, r = t for a share 1 - ratio of the batch, then r = min(t, r)   (py-meanflow v1)
  z_t = (1 - t) x + t eps, x from the data (the mixture's samples, or cached teacher samples: data-free)
  v = v_teacher(z_t, t), with CFG cond + (g - 1)(cond - uncond) on the velocity   (FastGen `_get_velocity`)
  du/dt: one forward-mode JVP of u_theta along the tangent (v, 0, 1) over (z, r, t)
  u_tgt = sg(v - (t - r) du/dt)
  L = E[ w ||u_theta(z_t, r, t) - u_tgt||^2 ],  w = sg(1 / (||.||^2 + c)^p)   (§4.3; py-meanflow `forward_with_loss`)
r = t reduces the target to v: flow matching onto the teacher. The JVP runs without gradient and the gradient comes
from a second forward (py-meanflow README, "Note on JVP"; FastGen does the same).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from stepdistill.config.schema import PairsConfig
from stepdistill.jvp import jvp
from stepdistill.objectives.base import Objective, ObjectiveConfig, OptimizerGroup
from stepdistill.objectives.continuous.meanflow_student import MeanFlowGenerator
from stepdistill.objectives.continuous.samples import CleanSamples
from stepdistill.objectives.rectified_flow.reflow import flow_student_schedule
from stepdistill.schedules import NoiseSchedule, _bcast
from stepdistill.teachers.base import Cond, Teacher


@dataclass
class MeanFlowConfig(ObjectiveConfig):
    """Defaults: Gsunshine/py-meanflow's CIFAR-10 run (`scripts/cifar10_v1.sh`: Adam lr 6e-4, betas (0.9, 0.999), no
    gradient clipping, tr_sampler v1) unless noted."""

    name: str = "meanflow"
    lr: float = 6.0e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    t_mean: float = -0.6  # t ~ logit-normal(t_mean, t_std)
    t_std: float = 1.6
    r_mean: float = -4.0  # r ~ logit-normal(r_mean, r_std), then r = min(t, r)
    r_std: float = 1.6
    ratio: float = 0.75  # share of the batch with r != t (the rest is flow matching onto the teacher)
    norm_p: float = 0.75  # adaptive weight 1 / (||err||^2 + norm_eps)^norm_p (p = 0 : plain L2)
    norm_eps: float = 1.0e-3
    teacher_guidance: float = 1.0  # the teacher's CFG on the velocity target (standard form, 1 = off)
    sample_steps: int = 1  # N of the export: N equal MeanFlow steps (1 = one-step x = eps - u(eps, 0, 1))
    # the time the backbone reads: "teacher" = the teacher's model timestep T s (a copy of a pretrained teacher or
    # of a flow student); "unit" = s itself, T = 1 (a fresh backbone, as the official code feeds t, h in [0, 1]:
    # a random network's sinusoids of T s vary too fast in s for the identity's du/dt, and training diverges)
    student_time: str = "teacher"
    data: str = "real"  # real (the analytic teacher's own samples) | teacher (cached teacher samples: data-free)
    pairs: PairsConfig = field(default_factory=PairsConfig)  # data=teacher: the cached teacher samples

    CHOICES = {"data": ("real", "teacher"), "student_time": ("teacher", "unit")}
    RANGES = {"lr": ">0", "weight_decay": ">=0", "t_std": ">0", "r_std": ">0", "ratio": "[0,1]", "norm_p": ">=0",
              "norm_eps": ">0", "teacher_guidance": ">=0", "sample_steps": ">=1"}


def logit_normal(n: int, mean: float, std: float, device: torch.device | str) -> Tensor:
    return torch.sigmoid(mean + std * torch.randn(n, device=device))


class MeanFlow(CleanSamples, Objective):
    name = "meanflow"
    config_class = MeanFlowConfig
    config: MeanFlowConfig
    generator: MeanFlowGenerator

    @classmethod
    def build_generator(cls, teacher: Teacher, backbone: nn.Module, student_cfg, config: MeanFlowConfig
                        ) -> MeanFlowGenerator:
        schedule = flow_student_schedule(teacher, student_cfg)
        if config.student_time == "unit":
            schedule = NoiseSchedule.flow(schedule.shift, 1, schedule.inference_grid)
        return MeanFlowGenerator(backbone, teacher, config.sample_steps, schedule)

    @property
    def reference_guidance(self) -> float:
        return self.config.teacher_guidance

    def optimizer_groups(self) -> list[OptimizerGroup]:
        c = self.config
        return [OptimizerGroup("generator", "generator.backbone", c.lr, weight_decay=c.weight_decay,
                               max_grad_norm=c.max_grad_norm)]

    # ------------------------------------------------------------------ pieces of the algorithm
    def sample_times(self, n: int) -> tuple[Tensor, Tensor]:
        """(r, t) in flow time: py-meanflow's sampler v1 (r = t with probability 1 - ratio, then r = min(t, r))."""
        c = self.config
        t = logit_normal(n, c.t_mean, c.t_std, self.device)
        r = logit_normal(n, c.r_mean, c.r_std, self.device)
        r = torch.where(torch.rand(n, device=self.device) < c.ratio, r, t)
        return torch.minimum(t, r), t

    @torch.no_grad()
    def teacher_velocity(self, z: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """v(z_t, t) = eps_hat - x0_hat of the teacher with CFG at the flow state z_t = (1 - t) x + t eps. The teacher
        reads its own state of the same (x, eps), found through TrigFlow (sigma_d = 1): the flow time t is the angle
        theta = atan2(t, 1 - t), and x_tau = (c_teacher / c_flow) z at the teacher's timestep tau(theta). For a flow
        teacher on the student's axis that is z itself at T t; a VP teacher is exact up to its largest sigma
        (tau clamped at T - 1: SD's sigma_max 14.6, flow times above 0.936)."""
        flow, teacher = self.generator.schedule, self.teacher.schedule
        theta = flow.trigflow_time(flow.flow_timestep(t), 1.0)
        c_flow = flow.from_trigflow(theta, 1.0)[1]
        tau, c_teacher = teacher.from_trigflow(theta, 1.0)
        tau = tau.to(torch.float32)
        x_tau = (_bcast(c_teacher / c_flow, z) * z.double()).to(z.dtype)
        out = self.teacher.guided_output(x_tau, tau, cond, self.config.teacher_guidance if cond.fields else 1.0)
        x0, eps = teacher.to_x0_eps(out, x_tau, tau)
        return flow.from_x0_eps(x0, eps, flow.flow_timestep(t), "flow")

    def tangents(self, v: Tensor, r: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The direction of d/dt along the trajectory: (dz/dt, dr/dt, dt/dt) = (v, 0, 1)."""
        return v, torch.zeros_like(r), torch.ones_like(t)

    def identity_target(self, v: Tensor, dudt: Tensor, r: Tensor, t: Tensor) -> Tensor:
        """u_tgt = v - (t - r) du/dt, detached."""
        return (v - _bcast(t - r, v) * dudt).detach()

    @torch.no_grad()
    def target(self, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond: Cond) -> Tensor:
        """u_tgt from one JVP of the student along `tangents` (no gradient: a target), in fp32 outside any autocast
        (py-meanflow runs its JVP with autocast off; FastGen's Wan config: bf16 training, fp32 JVP)."""
        def u(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
            return self.generator.average_velocity(z_, cond, r_, t_)

        with torch.autocast(z.device.type, enabled=False):
            _, dudt = jvp(u, (z.float(), r.float(), t.float()), tuple(x.float() for x in self.tangents(v, r, t)))
        return self.identity_target(v, dudt, r, t)

    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        c = self.config
        cond = self.source.encode(batch["cond_index"]).to(self.device)
        x = self.clean_samples(batch, len(cond))
        r, t = self.sample_times(len(x))
        z = self.generator.schedule.add_noise(x, torch.randn_like(x), self.generator.schedule.flow_timestep(t))
        v = self.teacher_velocity(z, t, cond)
        u_tgt = self.target(z, r, t, v, cond)
        u = self.generator.average_velocity(z, cond, r, t)
        err = (u - u_tgt).pow(2).flatten(1).sum(1)
        weight = (err.detach() + c.norm_eps).pow(-c.norm_p)
        return {"loss": (weight * err).mean(), "mse": err.detach().mean(),
                "fm_share": (r == t).float().mean()}

    def export(self, generator: MeanFlowGenerator, folder: Path) -> Path:
        """The stock backbone with the interval embedding folded in at h = T / N, sampled with N Euler steps
        (meanflow_student.py): a plain diffusers pipeline (or MLP folder) of the teacher's kind."""
        from stepdistill.export import export_student

        return export_student(generator.folded(), self.teacher, folder, objective=self.name)
