"""Regression onto the teacher's ODE endpoint: student(z) -> teacher_ODE(z).

DMD (Yin et al. 2024, Eq. 9) uses it as L_reg on cached noise/image pairs; rectified flow (Liu et al. 2023,
§2.3) uses it as its distillation stage. Pairs are generated once by the teacher and cached as safetensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

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
    num_pairs: int = 10000
    teacher_steps: int = 50  # DDIM/Euler steps of the teacher's ODE
    guidance: float = 1.0  # teacher CFG scale for the pairs (standard form; 1 = off)
    pair_dir: str = ""  # default: <output_dir>/pairs
    pair_seed: int = 0

    CHOICES = {"loss": ("l2", "pseudo_huber")}


class Regression(Objective):
    name = "regression"
    config_class = RegressionConfig
    config: RegressionConfig

    def optimizer_groups(self) -> list[OptimizerGroup]:
        c = self.config
        return [OptimizerGroup("generator", "generator.backbone", c.lr, weight_decay=c.weight_decay,
                               max_grad_norm=c.max_grad_norm)]

    def prepare_data(self, output_dir: str | Path, device: str = "cpu") -> None:
        """Generate (or reuse) the pair cache; runs once before training, on the main process."""
        c = self.config
        self._pair_dir = generate_pairs(self.teacher, self.source, c.pair_dir or Path(output_dir) / "pairs",
                                        c.num_pairs, c.teacher_steps, c.guidance, c.pair_seed, device=device)

    def dataset(self) -> Dataset:
        return PairDataset(self._pair_dir)

    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        cond = self.source.encode(batch["cond_index"]).to(self.device)
        x0_student = self.generator(batch["noise"].to(self.device), cond, 0)
        loss = reconstruction_loss(x0_student, batch["x0"].to(self.device), self.config.loss, self.config.huber_c)
        return {"loss": loss}
