"""What the TrigFlow objectives' tests share (sCD, rCM): the tiny pipelines they run on, with the exported
pipeline, scheduler and student times of each, and a recipe stage trained through the objectives' own phases."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)

from stepdistill.objectives import build_objective
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training.lean import optimize

PROMPT = "a photo of a cat"
# kind: (exported pipeline, scheduler, the student's times: 1 step, then the second)
KINDS = {"sd": (StableDiffusionPipeline, LCMScheduler, [999, 349]),
         "sd3": (StableDiffusion3Pipeline, FlowMatchEulerDiscreteScheduler, [1000, 496])}


def tiny_pipelines(root: Path) -> dict[str, Path]:
    return {k: save_tiny_pipeline(k, root / k) for k in KINDS}


def train_stage(cfg, final: str | Path) -> None:
    """A recipe stage (its steps, batch and LR schedule; seed 0) through the objective's phases, exported to
    `final`, where the next stage's student.init points."""
    torch.manual_seed(0)
    objective = build_objective(cfg, "cpu")
    objective.prepare_data(cfg.train.output_dir, "cpu")
    optimize(objective, cfg.train.max_steps, cfg.train.batch_size, 0, cfg.train.lr_scheduler)
    objective.export(objective.generator, final)
