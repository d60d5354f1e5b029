"""The shared shape of objectives that train one generator on the teacher's cached ODE pairs (regression, reflow,
flow-guided distillation): one optimizer group and the pair cache as the dataset. Their configs carry `lr`,
`weight_decay`, `max_grad_norm` and a `pairs` section."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from stepdistill.data import PairDataset, generate_pairs
from stepdistill.objectives.base import Objective, OptimizerGroup


class TeacherPairsObjective(Objective):
    def optimizer_groups(self) -> list[OptimizerGroup]:
        c = self.config
        return [OptimizerGroup("generator", "generator.backbone", c.lr, weight_decay=c.weight_decay,
                               max_grad_norm=c.max_grad_norm)]

    def prepare_data(self, output_dir: str | Path, device: str = "cpu") -> None:
        self._pair_dir = generate_pairs(self.teacher, self.source, self.config.pairs, output_dir, device)

    def dataset(self) -> Dataset:
        return PairDataset(self._pair_dir)
