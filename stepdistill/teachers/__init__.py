"""Teachers behind one adapter: the analytic GMM teacher, diffusers pipelines (SD1.x/2.x, SDXL, PixArt, SD3, Flux,
Wan text-to-video) and exported MLP students of ours (trained.py)."""
from __future__ import annotations

import torch

from stepdistill.schedules import NoiseSchedule
from stepdistill.teachers.base import Cond, Prediction, Teacher, apply_guidance
from stepdistill.teachers.gmm import GaussianMixture, GMMTeacher


def load_teacher(cfg, device: torch.device | str = "cpu") -> Teacher:
    """Build the teacher a TeacherConfig describes, on `device`."""
    if cfg.kind in ("gmm", "mlp"):
        if cfg.kind == "gmm" and cfg.path:
            raise ValueError("teacher.path is set but teacher.kind is gmm: set teacher.kind to "
                             "sd/sdxl/pixart/sd3/flux/wan/auto or mlp")
        mixture = GaussianMixture.ring(cfg.num_modes, cfg.radius, cfg.std, cfg.num_classes, cfg.own_weight)
        if cfg.kind == "mlp":
            from stepdistill.teachers.trained import TrainedMLPTeacher

            return TrainedMLPTeacher(cfg.path, mixture, device)
        schedule = NoiseSchedule.vp() if cfg.schedule == "vp" else NoiseSchedule.flow(cfg.flow_shift)
        return GMMTeacher(mixture, schedule, cfg.backbone_hidden, cfg.backbone_depth)
    from stepdistill.teachers.loading import load_diffusers_teacher

    return load_diffusers_teacher(cfg, device)


__all__ = ["Cond", "GMMTeacher", "GaussianMixture", "Prediction", "Teacher", "apply_guidance", "load_teacher"]
