"""Objectives by name, and the one function that builds a config's teacher, student and objective (used by the
trainer, the planner, the benchmark and the tests)."""
from __future__ import annotations

import torch

from stepdistill.objectives.base import Objective

REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Make an objective available as `objective.name: <cls.name>` (usable as a class decorator)."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} has no `name`")
    REGISTRY[cls.name] = cls
    return cls


def objective_class(name: str) -> type[Objective]:
    from stepdistill.config.schema import ConfigError, did_you_mean

    if name not in REGISTRY:
        raise ConfigError(f"objective.name: {name!r} is not one of {sorted(REGISTRY)}.{did_you_mean(name, REGISTRY)}")
    return REGISTRY[name]


def build_objective(cfg, device: torch.device | str = "cpu", teacher=None, prompts: list[str] | None = None
                    ) -> Objective:
    """Teacher, conditions, student and objective as the config describes them. The prompt file is read before the
    teacher loads, so a bad one fails fast; `teacher` (already built, e.g. on the meta device) skips loading."""
    from stepdistill.data import DEFAULT_PROMPTS, ConditionSource, read_prompts
    from stepdistill.students import build_backbone
    from stepdistill.teachers import load_teacher
    from stepdistill.teachers.base import apply_data_shape

    cls = objective_class(cfg.objective.name)
    if prompts is None and cfg.data.prompts_file:
        prompts = read_prompts(cfg.data.prompts_file)
    if teacher is None:
        teacher = load_teacher(cfg.teacher, device)
        apply_data_shape(teacher, cfg.data)
    if prompts is None and teacher.needs_prompts:
        prompts = DEFAULT_PROMPTS
    images = None
    if teacher.image_conditioned and cfg.data.image_dir:  # conditions are images with their captions
        from stepdistill.data.images import ImageFolderDataset

        images = ImageFolderDataset(cfg.data.image_dir, teacher.condition_image_size, cfg.data.bad_images)
    source = ConditionSource(teacher, prompts, images)
    generator = cls.build_generator(teacher, build_backbone(teacher, cfg.student), cfg.student, cfg.objective)
    return cls(teacher, generator, source, cfg.objective, cfg.data)
