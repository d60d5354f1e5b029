"""Reflow: a rectified flow trained on the deterministic coupling of a teacher ODE (Liu et al., ICLR 2023, §2.2-3.2;
InstaFlow, Liu et al., ICLR 2024, Eq. 3), optionally with SlimFlow's Annealing Reflow (Zhu et al., ECCV 2024, Eq. 9).

Couplings (z, x = ODE_teacher(z | c)) come from the pair cache: `pairs.steps` steps of the teacher's deterministic
sampler at `pairs.guidance` (InstaFlow: CFG 5 for SD1.5). In the package's flow convention (students/flow.py:
x_s = (1 - s) x + s z, u = z - x, network time t = T s, T at noise), each step:
  t ~ U over the student's flow time (uniform s for shift 1, as the paper), x_t = (1 - s) x + s z~
  L = E || u_theta(x_t, t | c) - (z~ - x) ||^2                                    (RF Eq. 1, InstaFlow Eq. 3)
  z~ = z (reflow), or sqrt(1 - beta^2) z + beta z' with fresh z' and beta_k = max(0, 1 - k / anneal_steps)
       (SlimFlow Eq. 9: from the independent coupling, beta = 1, to the teacher's, beta = 0)
The student is a FlowGenerator: a flow student of a VP teacher (student.schedule=flow on the teacher's time axis,
as InstaFlow fine-tunes SD's UNet to predict the velocity) or of a flow teacher (its own schedule). Its export
samples with N Euler steps for any N and is the next round's teacher (`teacher.path: ${stages.NAME.final}`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from stepdistill.config.schema import ConfigError, PairsConfig
from stepdistill.objectives.base import ObjectiveConfig
from stepdistill.objectives.teacher_pairs import TeacherPairsObjective
from stepdistill.students import student_schedule
from stepdistill.students.flow import FlowGenerator
from stepdistill.teachers.base import Teacher


@dataclass
class ReflowConfig(ObjectiveConfig):
    """Defaults: gnobitab/RectifiedFlow's CIFAR-10 reflow config (Adam lr 2e-4, grad clip 1) unless noted."""

    name: str = "reflow"
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    pairs: PairsConfig = field(default_factory=PairsConfig)  # the couplings; pairs.guidance = the teacher's CFG
    # share of prompts replaced by the null prompt, so that the k-RF also learns the unconditional velocity that
    # classifier-free guidance at sampling needs (0: conditional only)
    cond_dropout: float = 0.0
    # SlimFlow's Annealing Reflow: beta falls linearly from 1 to 0 over these steps (SlimFlow code: 300k of 800k
    # iterations); 0: plain reflow on the teacher's coupling
    anneal_steps: int = 0
    sample_steps: int = 1  # Euler steps of the export's default sampling (any number works)
    sample_guidance: float = 1.0  # CFG of the exported k-RF's sampling (InstaFlow's 2-RF: 1 to 2; 1 = off)

    RANGES = {"lr": ">0", "weight_decay": ">=0", "max_grad_norm": ">0", "cond_dropout": "[0,1)",
              "anneal_steps": ">=0", "sample_steps": ">=1", "sample_guidance": ">=1"}


def flow_student_schedule(teacher: Teacher, student_cfg):
    """The flow schedule of a flow student: the teacher's own if it is a flow, else student.schedule=flow."""
    schedule = student_schedule(teacher, student_cfg)
    if schedule.kind != "flow":
        raise ConfigError(f"a rectified-flow student needs a flow schedule but the teacher's is {schedule.kind}: "
                          "set student.schedule=flow (InstaFlow: the teacher's time axis, velocity prediction)")
    if student_cfg.prediction_type not in (None, "flow"):
        raise ConfigError(f"student.prediction_type={student_cfg.prediction_type}: a rectified flow predicts the "
                          "velocity; unset student.prediction_type")
    return schedule


class Reflow(TeacherPairsObjective):
    name = "reflow"
    config_class = ReflowConfig
    config: ReflowConfig
    generator: FlowGenerator

    @classmethod
    def build_generator(cls, teacher: Teacher, backbone: nn.Module, student_cfg, config: ReflowConfig
                        ) -> FlowGenerator:
        return FlowGenerator(backbone, teacher, config.sample_steps, flow_student_schedule(teacher, student_cfg),
                             config.sample_guidance)

    # ------------------------------------------------------------------ the loss, in its parts
    def anneal_beta(self, step: int) -> float:
        """SlimFlow's beta at training step `step`: 1 - k / anneal_steps, floored at 0 (0 throughout: reflow)."""
        if not self.config.anneal_steps:
            return 0.0
        return max(0.0, 1.0 - step / self.config.anneal_steps)

    def coupling_noise(self, noise: Tensor, step: int) -> Tensor:
        """z~ = sqrt(1 - beta^2) z + beta z' (SlimFlow Eq. 9); z itself when beta = 0."""
        beta = self.anneal_beta(step)
        if beta == 0.0:
            return noise
        return (1.0 - beta**2) ** 0.5 * noise + beta * torch.randn_like(noise)

    def interpolate(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """The straight interpolation x_t = (1 - s) x + s z at the student's time t = T s."""
        return self.generator.schedule.add_noise(x, z, t)

    def velocity_target(self, x: Tensor, z: Tensor) -> Tensor:
        """The regression target of the velocity: z - x (the flow schedule's u = eps - x0)."""
        return z - x

    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        cond = self.source.encode(batch["cond_index"]).to(self.device)
        cond = cond.null_with_prob(self.config.cond_dropout)
        x = batch["x0"].to(self.device, torch.float32)
        z = self.coupling_noise(batch["noise"].to(self.device, torch.float32), step)
        t = self.generator.schedule.sample_timesteps(len(x), 0.0, 1.0, self.device)
        u = self.generator.velocity(self.interpolate(x, z, t), cond, t)
        loss = nn.functional.mse_loss(u, self.velocity_target(x, z))
        return {"loss": loss, "beta": torch.tensor(self.anneal_beta(step))}
