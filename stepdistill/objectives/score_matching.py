"""Teacher score matching (TSM): a student backbone, typically smaller than the teacher's, regresses onto the frozen
teacher's denoiser at all noise levels, which makes it a diffusion model of its own before it is distilled into a
one-step generator (MSD: Song et al., ICML 2025, arXiv 2410.23274, §3.3, stage 0 of its smaller students):

    L_TSM = E_{x0, t, eps} lambda_t || mu_student(x_t, t) - mu_teacher(x_t, t) ||^2,   x_t = alpha_t x0 + sigma_t eps,

with t uniform over the whole timestep range. The paper leaves lambda_t unspecified; here the loss is the
unweighted MSE in the student's own parameterization (eps for an SD student: the DDPM "simple" loss), the weighting
the critic's denoising loss uses (DMD2's official code). x0 is clean data: the teacher's own ODE samples (cached
pairs, data-free) or real images (`data.image_dir`, captioned by `metadata.jsonl`, as the paper's real data).
MSD has no public code: the learning rate and length are this package's, per preset.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from stepdistill.config.schema import ConfigError, PairsConfig
from stepdistill.data import ConditionDataset, PairDataset, RealImages, generate_pairs, open_images
from stepdistill.objectives.base import Objective, ObjectiveConfig, OptimizerGroup
from stepdistill.teachers.base import Cond


@dataclass
class ScoreMatchingConfig(ObjectiveConfig):
    name: str = "score_matching"
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    data: str = "pairs"  # pairs (the teacher's ODE samples, cached) | images (data.image_dir with captions)
    pairs: PairsConfig = field(default_factory=PairsConfig)

    CHOICES = {"data": ("pairs", "images")}


class ScoreMatching(Objective):
    name = "score_matching"
    config_class = ScoreMatchingConfig
    config: ScoreMatchingConfig

    def optimizer_groups(self) -> list[OptimizerGroup]:
        c = self.config
        return [OptimizerGroup("generator", "generator.backbone", c.lr, weight_decay=c.weight_decay,
                               max_grad_norm=c.max_grad_norm)]

    @classmethod
    def preflight(cls, cfg) -> None:
        if cfg.objective.data == "images" and not cfg.data.image_dir:
            raise ConfigError("objective.data=images needs data.image_dir: a folder of real images with "
                              "metadata.jsonl captions (or use objective.data=pairs, the teacher's own samples)")

    def check_compatible(self) -> None:
        if self.generator.schedule is not self.teacher.schedule:
            raise ValueError("objective.name=score_matching trains the student on the teacher's noise schedule: set "
                             "student.schedule=teacher")

    def prepare_data(self, output_dir: str | Path, device: torch.device | str = "cpu") -> None:
        if self.config.data == "pairs":
            self._pair_dir = generate_pairs(self.teacher, self.source, self.config.pairs, output_dir, device)
            return
        if not self.data_config or not self.data_config.image_dir:
            raise ValueError("objective.data=images needs data.image_dir: a folder of real images with captions")
        folder = open_images(self.data_config.image_dir, self.data_config.resolution, self.data_config.bad_images)
        if folder.captions is None:
            raise ValueError(f"objective.data=images needs captions: add {self.data_config.image_dir}/metadata.jsonl "
                             '({"file_name": ..., "text": ...} per image), or use objective.data=pairs')
        self._images = RealImages(folder, self.teacher, output_dir)

    def dataset(self) -> Dataset:
        if self.config.data == "pairs":
            return PairDataset(self._pair_dir)
        return ConditionDataset(len(self._images))  # an epoch length; the images are drawn at random

    def clean_batch(self, batch: dict[str, Tensor]) -> tuple[Tensor, Cond]:
        """(x0, the conditions it belongs to) of a batch."""
        if self.config.data == "pairs":
            return batch["x0"], self.source.encode(batch["cond_index"])
        x0, captions = self._images.draw(len(batch["cond_index"]), torch.device("cpu"))
        return x0, self.teacher.encode(captions)

    @torch.no_grad()
    def target(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """mu_teacher(x_t, t): the teacher's conditional prediction (no guidance: the network the student stands
        in for), in the student's parameterization."""
        teacher = self.teacher.predict(x_t, t, cond)
        return self.teacher.schedule.from_x0_eps(teacher.x0, teacher.eps, t, self.generator.prediction_type)

    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        x0, cond = self.clean_batch(batch)
        x0, cond = x0.to(self.device), cond.to(self.device)
        schedule = self.teacher.schedule
        t = schedule.sample_timesteps(x0.shape[0], 0.0, 1.0, device=x0.device)  # all noise levels
        x_t = schedule.add_noise(x0, torch.randn_like(x0), t)
        out = self.generator.output(x_t, cond, t)
        return {"loss": torch.nn.functional.mse_loss(out.float(), self.target(x_t, t, cond).float())}
