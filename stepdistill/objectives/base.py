"""The objective contract: what a distillation method declares and computes. It never touches accelerate,
files or devices beyond its inputs; the trainer owns optimizers, precision, clipping, EMA and checkpoints."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from stepdistill.data import ConditionDataset, ConditionSource
from stepdistill.students import Generator
from stepdistill.teachers.base import Teacher


@dataclass
class ObjectiveConfig:
    """Fields common to every objective; each method extends it with its own (paper defaults, cited)."""

    name: str = ""


@dataclass
class OptimizerGroup:
    """One optimizer: the module attribute whose trainable parameters it updates, and its settings."""

    name: str  # the phase that steps it
    module: str  # attribute path on the objective, e.g. "generator.backbone" or "fake_score"
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0


def get_module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    setattr(get_module(root, ".".join(parents)) if parents else root, last, module)


class Objective(nn.Module):
    """A distillation method. Subclasses set `name`, build their modules in __init__ and implement `loss`."""

    name: ClassVar[str]
    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig

    def __init__(self, teacher: Teacher, generator: Generator, source: ConditionSource,
                 config: ObjectiveConfig) -> None:
        super().__init__()
        self.teacher, self.generator, self.source, self.config = teacher, generator, source, config

    def optimizer_groups(self) -> list[OptimizerGroup]:
        raise NotImplementedError

    def phases(self, step: int) -> list[str]:
        """Optimizer phases run at training step `step`, in order (default: every group once)."""
        return [g.name for g in self.optimizer_groups()]

    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Losses of `phase` for a batch: "loss" is backpropagated, other entries are logged."""
        raise NotImplementedError

    def after_step(self, phase: str, step: int) -> None:
        """Called after the optimizer of `phase` stepped (e.g. to update an EMA target network)."""

    def checkpoint_modules(self) -> list[nn.Module]:
        """Modules outside the optimizer groups whose state a resume must restore (e.g. an EMA target)."""
        return []

    def check_compatible(self) -> None:
        """Raise ValueError, naming the option and the fix, if this objective cannot work with its teacher or
        student (e.g. a flow-only option on an eps teacher); the trainer calls it before any heavy work."""

    def prepare_data(self, output_dir: str, device: torch.device | str) -> None:
        """Build caches (teacher pairs, latents) before training; called on the main process only."""

    def dataset(self) -> Dataset:
        """Training items; the default is one condition index per item."""
        return ConditionDataset(len(self.source))

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def noise(self, batch_size: int) -> Tensor:
        return torch.randn((batch_size, *self.teacher.sample_shape), device=self.device)


def reconstruction_loss(pred: Tensor, target: Tensor, kind: str, huber_c: float) -> Tensor:
    """Mean L2, or pseudo-Huber sqrt(d^2 + c^2) - c per element (Song & Dhariwal 2023; LCM uses c = 0.001)."""
    if kind == "l2":
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    if kind == "pseudo_huber":
        return (((pred.float() - target.float()) ** 2 + huber_c**2).sqrt() - huber_c).mean()
    raise ValueError(f"loss {kind!r} is not one of ('l2', 'pseudo_huber')")
