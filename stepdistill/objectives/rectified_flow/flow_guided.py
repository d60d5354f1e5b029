"""SlimFlow's Flow-Guided Distillation (Zhu et al., ECCV 2024, §3.3, Eqs. 11-13; code `teacher_loss_new`): a one-step
student of a k-rectified flow, trained on the k-RF's pairs plus a two-step guidance term from the k-RF.

In the package's flow convention (students/flow.py; s = t / T, s = 1 at noise, u = eps - x0), with the student's
velocity u_s = u_phi(z, T) and its one-step sample G(z) = z - u_s:
  L_distill = D(G(z0), x^)                           over the cached pairs (z0, x^ = ODE_kRF(z0))       (Eq. 11)
  L_2-step  = D(G(z), SG(x~)),  z fresh noise, s ~ U[0.2, 0.8] (SlimFlow §3.3)                          (Eq. 12)
      x_s = z + (s - 1) SG(u_s)          the student's own velocity for the first Euler step (`teacher_loss_new`)
      x~  = x_s - s u_kRF(x_s, T s)      the frozen k-RF's Euler step to the data
  L = L_distill + guidance_weight * L_2-step                                                            (Eq. 13)
D is L2 on the student's space, or LPIPS on decoded images (SlimFlow: LPIPS-VGG at 64 x 64). The teacher of this
stage is the k-RF itself (SlimFlow: the annealing-reflow 2-RF of the student's own size, which also initializes
the student), loaded from its export with `teacher.path: ${stages.NAME.final}`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from stepdistill.config.schema import ConfigError, PairsConfig
from stepdistill.objectives.base import ObjectiveConfig
from stepdistill.objectives.perceptual import LPIPS_NETS, LPIPSDistance, check_lpips_available, image_distance
from stepdistill.objectives.teacher_pairs import TeacherPairsObjective


@dataclass
class FlowGuidedConfig(ObjectiveConfig):
    """Defaults: yuanzhi-zhu/SlimFlow (Adam lr 2e-4, grad clip 1, intermediate time U[0.2, 0.8], unit weight)."""

    name: str = "flow_guided"
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    pairs: PairsConfig = field(default_factory=PairsConfig)  # (z0, x^) from this stage's teacher, the k-RF
    guidance_weight: float = 1.0  # weight of L_2-step
    s_min: float = 0.2  # flow time of the pseudo-intermediate point, U[s_min, s_max]
    s_max: float = 0.8
    teacher_guidance: float = 1.0  # CFG of the k-RF's velocity in L_2-step (1 = off)
    loss: str = "l2"  # l2 | lpips (on decoded images; needs the LPIPS backbone weights)
    lpips_net: str = "vgg"

    CHOICES = {"loss": ("l2", "lpips"), "lpips_net": LPIPS_NETS}
    RANGES = {"lr": ">0", "weight_decay": ">=0", "max_grad_norm": ">0", "guidance_weight": ">=0",
              "s_min": "[0,1]", "s_max": "[0,1]", "teacher_guidance": ">=0"}


class FlowGuided(TeacherPairsObjective):
    name = "flow_guided"
    config_class = FlowGuidedConfig
    config: FlowGuidedConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lpips = LPIPSDistance(self.config.lpips_net) if self.config.loss == "lpips" else None

    @classmethod
    def preflight(cls, cfg) -> None:
        c = cfg.objective
        if c.s_min > c.s_max:
            raise ConfigError(f"objective.s_min ({c.s_min}) must not exceed objective.s_max ({c.s_max})")
        if c.loss == "lpips":
            check_lpips_available(c.lpips_net)

    def check_compatible(self) -> None:
        if self.teacher.schedule.kind != "flow" or self.generator.prediction_type != "flow":
            raise ConfigError("flow_guided distills a rectified flow: teacher.path must be a flow (a k-rectified "
                              "flow export or a flow-matching pipeline) and the student must predict its velocity "
                              f"(teacher schedule {self.teacher.schedule.kind}, student prediction "
                              f"{self.generator.prediction_type})")
        if self.lpips is not None and not self.teacher.makes_images:
            raise ConfigError("objective.loss=lpips needs a teacher that makes images; set objective.loss=l2")

    def two_step_target(self, z: Tensor, u_student: Tensor, cond, s: Tensor) -> Tensor:
        """x~: the student's Euler step to flow time s, then the k-RF's Euler step to the data (no gradient)."""
        schedule, T = self.generator.schedule, self.generator.schedule.num_train_timesteps
        t_start, t_mid = self.generator.time(0, z), s.to(z.device, torch.float32) * T
        with torch.no_grad():
            x_mid = schedule.step(u_student.detach(), z, t_start, t_mid, "flow")
            u_teacher = self.teacher.guided_output(x_mid, t_mid, cond, self.config.teacher_guidance)
            return schedule.step(u_teacher, x_mid, t_mid, None, "flow")

    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        cond = self.source.encode(batch["cond_index"]).to(self.device)
        z0 = batch["noise"].to(self.device, torch.float32)
        t0 = self.generator.time(0, z0)
        distill = image_distance(self.lpips, self.teacher, self.generator(z0, cond, t0),
                                 batch["x0"].to(self.device, torch.float32))
        z = self.noise(len(cond))
        u = self.generator.output(z, cond, t0)
        one_step = self.generator.schedule.step(u, z, t0, None, "flow")
        s = self.config.s_min + (self.config.s_max - self.config.s_min) * torch.rand(len(z), dtype=torch.float64)
        guided = image_distance(self.lpips, self.teacher, one_step, self.two_step_target(z, u, cond, s))
        return {"loss": distill + self.config.guidance_weight * guided, "distill": distill.detach(),
                "two_step": guided.detach()}
