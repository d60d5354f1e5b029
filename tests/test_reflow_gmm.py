"""Rectified flow on the analytic teacher (ring of 8 Gaussians, std 0.1, SD's scaled_linear schedule, MLP students),
each stage of the shipped recipes (reflow_gmm, slimflow_gmm) trained with its preset's steps through the objective's
own loss (stepdistill/training/lean.py), exported, and handed to the next stage as its teacher; 4096 samples per metric.

Measured numbers are in each test's docstring (seed 0 unless noted; SW2 / energy distance of 4096 true samples
against the same reference, 5 sample seeds: 0.034-0.046 / 0.0007-0.0013, the floor of these metrics)."""
from __future__ import annotations

import pytest
import torch

from stepdistill.config import load_config_tree
from stepdistill.evaluation.distribution import evaluate_generator
from stepdistill.evaluation.straightness import straightness, teacher_flow_path
from stepdistill.objectives import build_objective
from stepdistill.objectives.rectified_flow import Reflow
from stepdistill.recipes import plan_stages
from stepdistill.recipes.runner import stage_config
from stepdistill.training.lean import build, optimize

REFLOW, SLIMFLOW = "configs/reflow_gmm.yaml", "configs/slimflow_gmm.yaml"
TWO_RF_ONE_STEP_SW2 = 0.12  # the bound for the 2-RF sampled with one Euler step


class WrongVelocitySign(Reflow):
    """Defect: InstaFlow's sign (data - noise) regressed by a student whose sampler reads eps - x0."""

    def velocity_target(self, x, z):
        return x - z


class ReversedTime(Reflow):
    """Defect: the interpolation on rectified flow's code axis (t = 0 at noise) while the network and its sampler
    read the package's axis (t = T at noise)."""

    def interpolate(self, x, z, t):
        return super().interpolate(x, z, self.generator.schedule.num_train_timesteps - t)


class ShuffledCouplings(Reflow):
    """Defect: the cached endpoints no longer belong to their noise (independent pairs: a 1-rectified flow)."""

    def dataset(self):
        data = super().dataset()
        data.tensors["x0"] = data.tensors["x0"][torch.randperm(len(data), generator=torch.Generator().manual_seed(0))]
        return data


def run_stage(preset: str, stage: str, root, overrides=(), objective_class=None, seed: int = 0):
    """Train stage `stage` of a preset's recipe (its steps, batch, LR schedule) and export it where the next
    stage's `${stages.NAME.final}` points."""
    tree = load_config_tree(preset, [f"train.output_dir={root}", f"train.seed={seed}", *overrides])
    stages = {s.name: s for s in plan_stages(tree)}
    cfg = stage_config(stages[stage], stages)
    torch.manual_seed(seed)
    objective = build_objective(cfg, "cpu")
    if objective_class is not None:
        objective = objective_class(objective.teacher, objective.generator, objective.source, cfg.objective,
                                    cfg.data)
    objective.prepare_data(cfg.train.output_dir, "cpu")
    optimize(objective, cfg.train.max_steps, cfg.train.batch_size, seed, cfg.train.lr_scheduler)
    objective.export(objective.generator, stages[stage].final)
    return objective


@pytest.fixture(scope="module")
def teacher_pairs(tmp_path_factory):
    """One cache of the teacher's couplings for every reflow run here (the key checks they are the same)."""
    return f"objective.pairs.dir={tmp_path_factory.mktemp('pairs')}"


@pytest.fixture(scope="module")
def reflow_rounds(tmp_path_factory, teacher_pairs):
    root = tmp_path_factory.mktemp("reflow_gmm")
    two_rf = run_stage(REFLOW, "rf2", root, [teacher_pairs])
    distilled = run_stage(REFLOW, "distill", root)
    return two_rf, distilled


@pytest.mark.slow
def test_two_rectified_flow_samples_in_one_euler_step_and_is_straighter_than_the_teacher(reflow_rounds):
    """2-RF (600 steps, seed 0): SW2 / ED at 1 Euler step 0.0519 / 0.0027, at 4 steps 0.0464 / 0.0021 (the
    teacher's 1-step DDIM: 0.683 / 0.665, its 100-step DDIM 0.048 / 0.0016). Straightness S over 100-step paths from 2048 noises: the teacher's
    probability-flow ODE (the 1-rectified flow) 0.591, the 2-RF 0.0042."""
    two_rf, _ = reflow_rounds
    one = evaluate_generator(two_rf.generator, seed=1, num_steps=1)
    four = evaluate_generator(two_rf.generator, seed=1, num_steps=4)
    assert one.sw2 <= TWO_RF_ONE_STEP_SW2 and four.sw2 <= 0.06, (one, four)
    teacher = two_rf.teacher
    noise = torch.randn(2048, 2, generator=torch.Generator().manual_seed(3))
    cond = teacher.encode(torch.zeros(2048, dtype=torch.long))
    one_rf = straightness(teacher_flow_path(teacher, noise, cond, 100))
    two = straightness(two_rf.generator.trajectory(noise, cond, 100))
    assert two < 0.1 * one_rf, (two, one_rf)


@pytest.mark.slow
def test_two_rectified_flow_distilled_to_one_step(reflow_rounds):
    """Regression (1000 steps) on 10000 pairs of the 2-RF (20 Euler steps), initialized from the 2-RF: SW2 / ED
    0.0453 / 0.0019 at seed 0. Plain regression on the teacher's own pairs (regression_gmm, seed 0) reaches
    0.0445 / 0.0017 at 1000 steps and 0.0455 / 0.0016 at 2000, the teacher's own 100-step samples 0.048 / 0.0016:
    all sit at the metrics' floor, so reflow does not beat plain regression here. The teacher's noise -> sample map
    of a 2-D ring is easy for a 281k-parameter MLP to fit in one step; reflow pays off where the 1-RF coupling is too
    curved to fit (CIFAR-10, Liu et al.: one-step distillation of the 1-RF 6.18 FID, of the 2-RF 4.85)."""
    _, distilled = reflow_rounds
    report = evaluate_generator(distilled.generator, seed=1)
    assert report.sw2 <= 0.05 and report.energy <= 0.002, report


@pytest.mark.slow
@pytest.mark.parametrize("defect", [WrongVelocitySign, ReversedTime, ShuffledCouplings])
def test_reflow_defects_fail_the_one_step_bound(defect, tmp_path, teacher_pairs):
    """Same preset, steps (600) and pairs as the 2-RF above, seed 0. One-step SW2 / ED: wrong sign 0.841 / 0.148,
    reversed time 0.745 / 0.192, shuffled couplings 0.668 / 0.639 (the last regresses onto the mixture's mean at
    s = 1, as the 1-RF of independent pairs must); the correct 2-RF: 0.052 / 0.0027."""
    objective = run_stage(REFLOW, "rf2", tmp_path, [teacher_pairs], objective_class=defect)
    report = evaluate_generator(objective.generator, seed=1, num_steps=1)
    assert report.sw2 > 2 * TWO_RF_ONE_STEP_SW2, report


@pytest.fixture(scope="module")
def slimflow(tmp_path_factory, teacher_pairs):
    root = tmp_path_factory.mktemp("slimflow_gmm")
    run_stage(SLIMFLOW, "anneal", root, [teacher_pairs])
    return run_stage(SLIMFLOW, "fgd", root)


@pytest.mark.slow
def test_slimflow_quarter_size_student_is_close_to_full_size_and_beats_plain_regression(reflow_rounds, slimflow,
                                                                                       teacher_pairs, tmp_path):
    """SlimFlow (hidden 128: 75k parameters, a quarter of the teacher-sized MLP's 281k; annealing reflow 2000 steps
    on the teacher's 10000 couplings, then flow-guided distillation 2000 steps on 10000 pairs of the small 2-RF):
    one-step SW2 / ED 0.0429 / 0.0015 at seed 0, 0.95x the full-size reflow-distilled student's 0.0453. The same
    small MLP trained by plain regression on the same 10000 teacher pairs (regression_gmm's 2000 steps): 0.0454 /
    0.0016. Seed 1: SlimFlow 0.0420, full size 0.0425, plain regression 0.0442. All sit at the metrics' floor: the
    margin over plain regression (4-6%) is smaller than the spread of true samples' own SW2 over sample seeds
    (0.034-0.046), so the ordering holds at the two seeds measured but is no robust gap on this bench."""
    _, distilled = reflow_rounds
    parameters = [sum(p.numel() for p in o.generator.backbone.parameters()) for o in (slimflow, distilled)]
    assert parameters[0] * 3.5 <= parameters[1] <= parameters[0] * 4.5, parameters
    small = build("configs/regression_gmm.yaml", ["student.kind=smaller", "student.overrides={hidden: 128}",
                                                  teacher_pairs])
    small.prepare_data(tmp_path, "cpu")
    optimize(small, 2000, 256, 0, "cosine")
    slim, full, plain = (evaluate_generator(o.generator, seed=1) for o in (slimflow, distilled, small))
    assert slim.sw2 <= 1.3 * full.sw2 and slim.sw2 < plain.sw2, (slim, full, plain)
