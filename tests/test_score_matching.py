"""Teacher score matching (TSM, MSD §3.3) and smaller students: the loss is zero for a copy of the teacher, trains only
the student, and makes a half-width student a denoiser of the analytic teacher; a target at the wrong time fails.

Measured (half-width MLP student, hidden 64 vs the teacher-sized 128, x0-parameterized, 4096 cached 50-step teacher
pairs, batch 256, lr 1e-3, seed 0): mean squared x0 error against the teacher's denoiser over t ~ U[0, 999],
4096 mixture samples: 0.488 untrained, 0.0029 after 500 steps, 0.0015 after 1000, 0.0009 after 2000; with the
teacher queried at 999 - t (defect) 1000 steps leave 0.428.
"""
from __future__ import annotations

import pytest
import torch

from stepdistill.config import load_config
from stepdistill.objectives import build_objective
from stepdistill.objectives.score_matching import ScoreMatching
from stepdistill.students.build import build_smaller_backbone
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training.lean import optimize

GMM = ["teacher.num_classes=8", "teacher.backbone_hidden=128", "student.prediction_type=sample",
       "objective.name=score_matching", "objective.lr=1e-3", "objective.pairs.num=4096", "objective.pairs.steps=50",
       "student.kind=smaller", "student.width=0.5"]


class ReversedTime(ScoreMatching):
    """Defect: the target is the teacher's prediction at 999 - t."""

    def target(self, x_t, t, cond):
        return super().target(x_t, self.teacher.schedule.num_train_timesteps - 1 - t, cond)


def denoiser_error(objective, n: int = 4096, seed: int = 5) -> float:
    """E ||x0_student(x_t, t) - x0_teacher(x_t, t)||^2 over mixture samples and t ~ U[0, 999]."""
    teacher = objective.teacher
    g = torch.Generator().manual_seed(seed)
    labels = teacher.sample_conditions(n, generator=g)
    x0 = teacher.mixture.sample(n, labels, generator=g)
    t = torch.rand(n, generator=g) * 999
    x_t = teacher.schedule.add_noise(x0, torch.randn(n, 2, generator=g), t)
    cond = teacher.encode(labels)
    with torch.no_grad():
        return float((objective.generator(x_t, cond, t) - teacher.predict(x_t, t, cond).x0).pow(2).sum(1).mean())


def tsm(tmp_path, cls=ScoreMatching, steps: int = 1000):
    torch.manual_seed(0)
    objective = build_objective(load_config(None, GMM), "cpu")
    objective.__class__ = cls
    objective.prepare_data(str(tmp_path), "cpu")
    return optimize(objective, steps, 256)


def test_half_width_student_becomes_the_teachers_denoiser_and_a_wrong_time_target_does_not(tmp_path):
    untrained = denoiser_error(tsm(tmp_path, steps=0))
    trained = denoiser_error(tsm(tmp_path))
    reversed_time = denoiser_error(tsm(tmp_path, ReversedTime))
    assert untrained > 0.3 and trained < 0.005 and reversed_time > 0.05, (untrained, trained, reversed_time)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny") / "sd")


def sd_config(folder, *extra):
    return load_config(None, ["objective.name=score_matching", "teacher.kind=sd", f"teacher.path={folder}",
                              "objective.pairs.num=4", "objective.pairs.steps=2", *extra])


def test_a_copy_of_the_teacher_has_zero_loss_and_a_smaller_student_alone_gets_gradients(tiny_sd, tmp_path):
    copy = build_objective(sd_config(tiny_sd), "cpu")
    copy.prepare_data(str(tmp_path), "cpu")
    batch = {k: v[:2] for k, v in copy.dataset().tensors.items()}
    assert copy.loss("generator", batch, 0)["loss"].item() < 1e-10  # the target is the teacher's own output

    smaller = build_objective(sd_config(tiny_sd, "student.kind=smaller", "student.width=0.5"), "cpu")
    smaller.prepare_data(str(tmp_path), "cpu")
    assert smaller.generator.backbone.config.block_out_channels == [16, 32]
    loss = smaller.loss("generator", batch, 0)["loss"]
    loss.backward()
    assert loss.item() > 1e-4
    assert all(p.grad is not None for p in smaller.generator.backbone.parameters())
    assert all(p.grad is None for p in smaller.teacher.backbone.parameters())


def test_width_ratio_scales_unet_channels_and_keeps_its_group_norms_valid(tiny_sd):
    teacher_unet = build_objective(sd_config(tiny_sd), "cpu").teacher.backbone
    half = build_smaller_backbone(teacher_unet, {}, 0.5)
    params = sum(p.numel() for p in half.parameters()) / sum(p.numel() for p in teacher_unet.parameters())
    assert half.config.block_out_channels == [16, 32] and half.config.norm_num_groups == 16 and 0.2 < params < 0.35
    with pytest.raises(ValueError, match="student.width < 1 or student.overrides"):
        build_smaller_backbone(teacher_unet, {}, 1.0)
