"""The objective contract: what a distillation method declares and computes. An objective never touches
accelerate, files or devices beyond its inputs, and never sees a wrapped module; the trainer owns optimizers,
precision, clipping, EMA and checkpoints.

Hooks with defaults that a method overrides where it differs: `build_generator` (its own sampling),
`preflight` (refusals before anything loads), `shares_teacher_backbone`, `plan_hints` (the memory planner's
rungs), `export` (its export product)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from stepdistill.data import ConditionDataset, ConditionSource
from stepdistill.students import Generator, RenoiseGenerator, student_schedule
from stepdistill.teachers.base import Cond, Teacher


@dataclass
class ObjectiveConfig:
    """Fields common to every objective; each method extends it with its own (paper defaults, cited)."""

    name: str = ""


@dataclass
class OptimizerGroup:
    """One optimizer: the module attribute whose trainable parameters it updates, and its settings."""

    name: str  # the phase that steps it
    module: str  # attribute path on the objective, e.g. "generator.backbone" or "critic"
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0


@dataclass
class PlanHints:
    """What the memory planner needs to know of an objective beyond its optimizer groups."""

    # config overrides for the planner's meta-device build (e.g. no real-image data to read)
    meta_overrides: list[str] = field(default_factory=list)
    # objective-specific memory rungs: (name, config overrides), tried after the generic ones
    rungs: list[tuple[str, list[str]]] = field(default_factory=list)


def get_module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    setattr(get_module(root, ".".join(parents)) if parents else root, last, module)


class Objective(nn.Module):
    """A distillation method. Subclasses set `name` and `config_class`, build their modules in __init__ and
    implement `optimizer_groups` and `loss`."""

    name: ClassVar[str]
    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig

    def __init__(self, teacher: Teacher, generator: Generator, source: ConditionSource,
                 config: ObjectiveConfig, data=None) -> None:
        super().__init__()
        self.teacher, self.generator, self.source, self.config = teacher, generator, source, config
        self.data_config = data  # the config's data section (real images), where the objective reads any

    # ------------------------------------------------------------------ construction hooks
    @classmethod
    def build_generator(cls, teacher: Teacher, backbone: nn.Module, student_cfg, config: ObjectiveConfig
                        ) -> Generator:
        """The student: by default a k-step re-noising generator at `student.timesteps`."""
        return RenoiseGenerator(backbone, teacher, student_cfg.timesteps, student_schedule(teacher, student_cfg),
                                student_cfg.prediction_type)

    @classmethod
    def preflight(cls, cfg) -> None:
        """Raise ConfigError, naming the key and the fix, for configs this objective refuses; runs before the
        teacher loads."""

    @classmethod
    def shares_teacher_backbone(cls, config: ObjectiveConfig) -> bool:
        """Whether a trained network uses the teacher's own backbone as its base (teacher.offload is then
        refused: the base must stay resident)."""
        return False

    @classmethod
    def plan_hints(cls, cfg) -> PlanHints:
        return PlanHints()

    @property
    def reference_guidance(self) -> float:
        """The CFG scale of the teacher distribution the student learns (standard form; the sample guards compare
        the student with the teacher sampled at it)."""
        return 1.0

    # ------------------------------------------------------------------ training
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
        student; the trainer calls it before any heavy work."""

    def prepare_data(self, output_dir: str | Path, device: torch.device | str) -> None:
        """Build caches (teacher pairs, latents) before training; every process calls it, the main process
        first, so the others reuse what it wrote."""

    def dataset(self) -> Dataset:
        """Training items; the default is one condition index per item."""
        return ConditionDataset(len(self.source))

    def trace_phase(self, phase: str, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The forward with gradient that `phase` backpropagates through, on probe inputs: what the memory planner
        traces. The default covers generator phases."""
        group = next(g for g in self.optimizer_groups() if g.name == phase)
        if group.module != "generator.backbone":
            raise NotImplementedError(f"{type(self).__name__} must say how phase {phase!r} runs (trace_phase)")
        return self.generator.output(x, cond, t)

    # ------------------------------------------------------------------ export
    def export(self, generator: Generator, folder: Path) -> Path:
        """Write the trained student (`generator`, unwrapped, EMA weights in) into `folder`, atomically. The
        default product: a student folder as the teacher's kind allows (export/)."""
        from stepdistill.export import export_student

        return export_student(generator, self.teacher, folder, objective=self.name)

    # ------------------------------------------------------------------ helpers
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
