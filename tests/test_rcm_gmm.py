"""rCM (sCD plus the DMD regularizer, stepdistill/objectives/continuous/rcm.py) on the analytic GMM teacher.

The pieces: the official update schedule (sCD alone in the warm-up, then one student step in `student_update_freq`
and the critic on the others), gradients reaching only the phase's own modules, the DMD term's gradient equal to
2 grad / D with grad the normalized (x0_fake - x0_teacher) / mean|G - x0_teacher|, p_D's shift, the rollout's
gradient through its last step only, and dmd_weight 0 being sCD. The acceptance run trains configs/rcm_gmm.yaml's
recipe (the sCD preset's pretrain stage, then rCM) through the objectives' own phases, 4096 samples per metric.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepdistill.config import load_config_tree
from stepdistill.objectives import build_objective
from stepdistill.objectives.continuous.rcm import RCM
from stepdistill.recipes import plan_stages
from stepdistill.recipes.runner import stage_config

PRESET = Path(__file__).parents[1] / "configs" / "rcm_gmm.yaml"


def stage_cfg(stage: str, root: Path, **objective):
    tree = load_config_tree(PRESET, [f"train.output_dir={root}"])
    for stage_tree in tree["recipe"]:
        if stage_tree["name"] == stage:
            stage_tree["set"].update({f"objective.{k}": v for k, v in objective.items()})
    stages = {s.name: s for s in plan_stages(tree)}
    return stage_config(stages[stage], stages), stages[stage]


def rcm_objective(root: Path, **objective) -> RCM:
    """The `rcm` stage's objective with a fresh MLP (the pieces do not need the pretrained one)."""
    cfg, _ = stage_cfg("rcm", root, **objective)
    cfg.student.init = ""
    torch.manual_seed(0)
    return build_objective(cfg, "cpu")


def grads(module: torch.nn.Module) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters()]


def test_update_schedule_is_the_official_one(tmp_path):
    """Warm-up (1000 steps): the student (sCD and its weighting) every step; then the student at 1000, 1005, ...
    and the critic at every other step; dmd_weight 0 never runs the critic."""
    objective = rcm_objective(tmp_path)
    assert objective.config.tangent_warmup == 1000 and objective.config.student_update_freq == 5
    assert all(objective.phases(s) == ["generator", "weighting"] for s in (0, 1, 999))
    assert [objective.phases(s) for s in range(1000, 1006)] == [
        ["generator", "weighting"], ["critic"], ["critic"], ["critic"], ["critic"], ["generator", "weighting"]]
    plain = rcm_objective(tmp_path, dmd_weight=0.0)
    assert all(plain.phases(s) == ["generator", "weighting"] for s in (999, 1001, 5003))


def test_gradients_reach_only_the_phase_modules(tmp_path):
    objective = rcm_objective(tmp_path)
    batch = {"cond_index": torch.zeros(32, dtype=torch.long)}
    losses = objective.loss("generator", batch, 1000)
    assert {"scd", "dmd", "dmd_grad_norm"} <= losses.keys()
    losses["loss"].backward()
    assert all(grads(objective.generator.backbone)) and not any(grads(objective.critic))
    assert not any(grads(objective.weighting))
    objective.zero_grad(set_to_none=True)
    objective.loss("critic", batch, 1001)["loss"].backward()
    assert all(grads(objective.critic)) and not any(grads(objective.generator.backbone))


def test_dmd_term_gradient_is_the_normalized_score_difference(tmp_path):
    """d/dG of ||G - sg(G - grad)||^2 / D, batch-averaged, is 2 grad / (D B) with grad = (x0_fake - x0_teacher) /
    mean|G - x0_teacher|: pointing from the teacher's x0 toward the fake one, so a descent step moves G toward
    the teacher."""
    objective = rcm_objective(tmp_path)
    cond = objective.source.encode(torch.zeros(8, dtype=torch.long))
    G = (0.5 * torch.randn(8, 2)).requires_grad_(True)
    torch.manual_seed(3)
    loss, grad = objective.dmd_loss(G, cond)
    loss.backward()
    torch.testing.assert_close(G.grad.double(), 2 * grad / (2 * 8), rtol=1e-6, atol=1e-9)
    torch.manual_seed(3)  # the same t_D and noise: grad rebuilt from the two scores
    x_t, t = objective.noised(G.detach())
    x0_teacher = objective.teacher.schedule.trigflow_x0(objective.teacher_velocity(x_t, t, cond), x_t, t)
    x0_fake = objective.x0(objective.fake_velocity(cond.fields), x_t, t)
    scale = (G.detach().double() - x0_teacher).abs().mean(1, keepdim=True)
    torch.testing.assert_close(grad, (x0_fake - x0_teacher) / scale)


def test_dmd_times_follow_the_shifted_uniform(tmp_path):
    """p_D: sigma_d tan t_D = 5u / (1 - u): its median is 5 (u = 1/2)."""
    objective = rcm_objective(tmp_path)
    torch.manual_seed(0)
    t = objective.dmd_times(20000)
    ratio = objective.config.sigma_d * t.tan()
    lo, hi = objective.time_range
    assert float(t.min()) >= lo and float(t.max()) <= hi
    assert abs(float(ratio.median()) - 5.0) < 0.25


def test_rollout_carries_gradient_through_its_last_step_only(tmp_path):
    """An n-step rollout's gradient equals that of its last student call on the (detached) input it received."""
    objective = rcm_objective(tmp_path)
    cond = objective.source.encode(torch.zeros(16, dtype=torch.long))
    calls = []
    backbone = objective.generator.backbone
    handle = backbone.register_forward_hook(lambda m, args, out: calls.append(args[0]))
    G = objective.rollout(cond, 3, with_grad=True)
    handle.remove()
    assert len(calls) == 3 and G.requires_grad
    assert not calls[0].requires_grad and not calls[1].requires_grad  # inputs: detached noise and re-noisings
    G.sum().backward()
    assert all(grads(backbone))
    objective.zero_grad(set_to_none=True)
    assert not objective.rollout(cond, 2, with_grad=False).requires_grad


def test_without_dmd_weight_the_student_loss_is_scd(tmp_path):
    """dmd_weight 0: the student loss is lambda_sCM times the sCD loss of the same draw (no DMD term)."""
    batch = {"cond_index": torch.zeros(16, dtype=torch.long)}
    objective = rcm_objective(tmp_path, dmd_weight=0.0)
    torch.manual_seed(5)
    losses = objective.loss("generator", batch, 2000)
    assert "dmd" not in losses
    torch.testing.assert_close(losses["loss"], objective.config.scm_weight * losses["scd"])
