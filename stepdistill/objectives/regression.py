"""Regression onto the teacher's ODE endpoint: student(z) -> teacher_ODE(z).

DMD (Yin et al. 2024, Eq. 9) uses it as L_reg on cached noise/image pairs; rectified flow (Liu et al. 2023,
§2.3) and InstaFlow (Liu et al. 2024, Eq. 6) use it as their distillation stage, on pairs of the k-rectified flow,
with L2 then LPIPS on decoded images. Pairs are generated once by the teacher and cached as safetensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from stepdistill.config.schema import ConfigError, PairsConfig
from stepdistill.objectives.base import ObjectiveConfig, reconstruction_loss
from stepdistill.objectives.perceptual import LPIPS_NETS, LPIPSDistance, check_lpips_available, image_distance
from stepdistill.objectives.teacher_pairs import TeacherPairsObjective


@dataclass
class RegressionConfig(ObjectiveConfig):
    name: str = "regression"
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss: str = "l2"  # l2 | pseudo_huber | lpips (on decoded images; needs the LPIPS backbone weights)
    huber_c: float = 0.001
    lpips_net: str = "vgg"  # rectified flow's code: LPIPS-VGG
    pairs: PairsConfig = field(default_factory=PairsConfig)

    CHOICES = {"loss": ("l2", "pseudo_huber", "lpips"), "lpips_net": LPIPS_NETS}


class Regression(TeacherPairsObjective):
    name = "regression"
    config_class = RegressionConfig
    config: RegressionConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lpips = LPIPSDistance(self.config.lpips_net) if self.config.loss == "lpips" else None

    @classmethod
    def preflight(cls, cfg) -> None:
        if cfg.objective.loss == "lpips":
            check_lpips_available(cfg.objective.lpips_net)

    def check_compatible(self) -> None:
        if self.lpips is not None and not self.teacher.makes_images:
            raise ConfigError("objective.loss=lpips needs a teacher that makes images; set objective.loss=l2")

    @property
    def reference_guidance(self) -> float:
        return self.config.pairs.guidance

    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        cond = self.source.encode(batch["cond_index"]).to(self.device)
        noise = batch["noise"].to(self.device)
        x0_student = self.generator(noise, cond, self.generator.time(0, noise))
        target = batch["x0"].to(self.device)
        if self.lpips is not None:
            return {"loss": image_distance(self.lpips, self.teacher, x0_student, target)}
        return {"loss": reconstruction_loss(x0_student, target, self.config.loss, self.config.huber_c)}
