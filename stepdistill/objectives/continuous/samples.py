"""Clean samples x0 for the continuous-time objectives, which train on (x0, noise) like diffusion training: the
analytic teacher's own samples (`objective.data: real`) or cached teacher ODE samples (`objective.data: teacher`,
data-free distillation, the pair cache of `objective.pairs`)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from stepdistill.config.schema import ConfigError
from stepdistill.data import PairDataset, generate_pairs


class CleanSamples:
    """Mixin for an Objective whose config has `data` ("real" | "teacher") and `pairs`."""

    def prepare_data(self, output_dir: str | Path, device: torch.device | str = "cpu") -> None:
        if self.config.data == "real":
            if self.teacher.mixture is None:
                raise ConfigError("objective.data=real needs a teacher with its own data (the GMM teacher); use "
                                  "objective.data=teacher to train on cached teacher samples (data-free)")
            return
        self._pair_dir = generate_pairs(self.teacher, self.source, self.config.pairs, output_dir, device)

    def dataset(self) -> Dataset:
        return super().dataset() if self.config.data == "real" else PairDataset(self._pair_dir)

    def clean_samples(self, batch: dict[str, Tensor], n: int) -> Tensor:
        if self.config.data == "teacher":
            return batch["x0"].to(self.device, torch.float32)
        mixture = self.teacher.mixture
        labels = batch["cond_index"].cpu() if mixture.conditional else None
        return mixture.sample(n, labels).to(self.device)
