"""Regression onto the teacher's ODE endpoint: student(z) -> teacher_ODE(z).

DMD (Yin et al. 2024, Eq. 9) uses it as L_reg on cached noise/image pairs; rectified flow (Liu et al. 2023,
§2.3) uses it as its distillation stage. Pairs are generated once by the teacher and cached as safetensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from stepdistill.config import PairsConfig
from stepdistill.data import PairDataset, generate_pairs
from stepdistill.objectives.base import Objective, ObjectiveConfig, OptimizerGroup, reconstruction_loss


@dataclass
class RegressionConfig(ObjectiveConfig):
    name: str = "regression"
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss: str = "l2"  # l2 | pseudo_huber
    huber_c: float = 0.001
    pairs: PairsConfig = field(default_factory=PairsConfig)

    CHOICES = {"loss": ("l2", "pseudo_huber")}


class Regression(Objective):
    name = "regression"
    config_class = RegressionConfig
    config: RegressionConfig

    @property
    def reference_guidance(self) -> float:
        return self.config.pairs.guidance

    def optimizer_groups(self) -> list[OptimizerGroup]:
        c = self.config
        return [OptimizerGroup("generator", "generator.backbone", c.lr, weight_decay=c.weight_decay,
                               max_grad_norm=c.max_grad_norm)]

    def prepare_data(self, output_dir: str | Path, device: str = "cpu") -> None:
        self._pair_dir = generate_pairs(self.teacher, self.source, self.config.pairs, output_dir, device)

    def dataset(self) -> Dataset:
        return PairDataset(self._pair_dir)

    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        cond = self.source.encode(batch["cond_index"]).to(self.device)
        noise = batch["noise"].to(self.device)
        x0_student = self.generator(noise, cond, self.generator.time(0, noise))
        loss = reconstruction_loss(x0_student, batch["x0"].to(self.device), self.config.loss, self.config.huber_c)
        return {"loss": loss}
