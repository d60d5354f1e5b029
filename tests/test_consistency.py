"""Consistency distillation (LCM, MCD segments, stages) on the analytic GMM teacher.

The acceptance runs train through the objective's own phases (stepdistill/training/lean.py) with the preset's steps,
batch and LR schedule; the rest checks the algorithm's pieces against diffusers and short training runs.
Measured at 6000 steps, 4096 samples (seed 0; seed 1 in brackets):
  LCM        1-step SW2 0.055 [0.057], ED 0.0029 [0.0032], precision 0.84 [0.84]; 4-step SW2 0.044 [0.041], ED 0.0019
  MCD S=4    4-step SW2 0.054, ED 0.0025, precision 0.89
  guided w=3 1-step mode TV vs the teacher's 200-step CFG samples 0.038
  defects    no boundary scalings: 1-step SW2 0.55; solver stepping towards noise: 1-step SW2 0.53;
             online target with gradients: 1-step SW2 0.065, ED 0.0047, precision 0.76 (fails ED and precision,
             by a narrow margin: ED +17 %, precision -0.04); 4-step ED 0.0037 (> 0.003).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
    LatentConsistencyModelPipeline,
)

from stepdistill.config import load_config, load_config_tree
from stepdistill.evaluation.distribution import evaluate_generator
from stepdistill.export import load_mlp_student
from stepdistill.objectives import build_objective
from stepdistill.objectives.consistency import (
    Consistency,
    guidance_embedding,
    lcm_timesteps,
    segment_boundaries,
    segment_timesteps,
)
from stepdistill.recipes import plan_stages, run_recipe
from stepdistill.recipes.runner import stage_config
from stepdistill.schedules import NoiseSchedule, _bcast
from stepdistill.students import Generator, OdeGenerator, RenoiseGenerator
from stepdistill.students.lora import adapters_off, add_lora
from stepdistill.training import Trainer
from stepdistill.training.lean import build, optimize

CONFIG = Path(__file__).parents[1] / "configs" / "consistency_gmm.yaml"


def make_config(tmp_path: Path, *overrides: str):
    return load_config(CONFIG, [f"train.output_dir={tmp_path}", "train.overwrite=true", "train.progress=false",
                                *overrides])


# ------------------------------------------------------------------ deliberate defects (test-only subclasses)
class OnlineTargetWithGrad(Consistency):
    """Defect: the target is the online network, with gradients flowing through it."""

    def consistency_target(self, x_s, s, boundary, fields):
        target = self.consistency_map(self.generator.backbone, x_s, s, boundary, fields)
        return torch.where(_bcast(s == boundary, x_s), x_s.float(), target)


class SolverTowardsNoise(Consistency):
    """Defect: the teacher's solver steps t -> t + k instead of t -> t - k."""

    def solver_end(self, t):
        return (t + self.skip).clamp(max=self.teacher.schedule.num_train_timesteps - 1)


class NoBoundaryScalings(Consistency):
    """Defect: c_skip = 0, c_out = 1, so nothing anchors the map at t = 0."""

    def scalings(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.zeros_like(t), torch.ones_like(t)


def train(cfg, objective_class=Consistency):
    objective = build_objective(cfg, "cpu")
    objective.__class__ = objective_class
    trainer = Trainer(cfg, objective)
    trainer.train()
    return trainer.generator_for_inference(), objective


def lcm_sampler(generator: Generator, objective: Consistency, steps: int) -> Generator:
    return RenoiseGenerator(generator.backbone, generator.teacher, lcm_timesteps(objective.grid, steps),
                            generator.schedule, generator.prediction_type)


# ------------------------------------------------------------------ pieces against diffusers
def test_boundary_scalings_equal_lcm_scheduler():
    scheduler = LCMScheduler(timestep_scaling=10.0)
    schedule = NoiseSchedule.vp()
    for t in (0, 1, 19, 259, 999):
        c_skip, c_out = schedule.boundary_scalings(torch.tensor(float(t)))
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert float(c_skip) == pytest.approx(ref_skip, rel=1e-12)
        assert float(c_out) == pytest.approx(ref_out, rel=1e-12, abs=1e-15)


def test_solver_grid_equals_lcm_script_and_scheduler():
    grid = NoiseSchedule.vp().skipping_step_grid(50)
    # diffusers' DDIMSolver: (arange(1, N + 1) * (T // N)).round() - 1
    assert grid.tolist() == [(i + 1) * 20 - 1 for i in range(50)]
    scheduler = LCMScheduler(original_inference_steps=50)
    for n in (1, 2, 4, 8):
        scheduler.set_timesteps(n)
        assert lcm_timesteps(grid, n) == scheduler.timesteps.tolist()


def test_guidance_embedding_equals_lcm_pipeline():
    w = torch.tensor([0.0, 2.0, 7.5])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(guidance_embedding(w, 256), ref)


def test_segment_geometry():
    grid = NoiseSchedule.vp().skipping_step_grid(50)
    assert segment_timesteps(grid, 4) == [999, 739, 499, 239]  # PCM's phase edges floor(j N / S)
    b = segment_boundaries(grid, 4)
    assert b[:12].eq(-1).all() and b[12:25].eq(239).all() and b[25:37].eq(499).all() and b[37:].eq(739).all()
    assert segment_boundaries(grid, 1).eq(-1).all()


# ------------------------------------------------------------------ gradients, target, EMA
def test_only_online_student_gets_gradients_and_ema_update(tmp_path):
    cfg = make_config(tmp_path, "train.batch_size=32")
    objective = build_objective(cfg, "cpu")
    loss = objective.loss("generator", {"cond_index": torch.zeros(32, dtype=torch.long)}, 0)["loss"]
    loss.backward()
    online = objective.generator.backbone
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online.parameters())
    target = objective.target_backbone
    assert all(not p.requires_grad and p.grad is None for p in target.parameters())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    objective.after_step("generator", 0)
    mu = cfg.objective.ema_decay
    for name, p in online.named_parameters():  # theta^- <- mu theta^- + (1 - mu) theta
        torch.testing.assert_close(target.state_dict()[name], mu * before[name] + (1 - mu) * p.detach())


def test_defect_online_target_sends_gradients_through_the_target(tmp_path):
    """The defect hook really changes the gradient (so its failing the bounds is the defect's doing)."""
    cfg = make_config(tmp_path, "train.batch_size=64")
    grads = []
    for cls in (Consistency, OnlineTargetWithGrad):
        torch.manual_seed(0)
        objective = build_objective(cfg, "cpu")
        objective.__class__ = cls
        torch.manual_seed(1)
        objective.loss("generator", {"cond_index": torch.zeros(64, dtype=torch.long)}, 0)["loss"].backward()
        grads.append(objective.generator.backbone.out[1].weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_lora_base_with_adapters_disabled_is_the_base(tmp_path):
    cfg = make_config(tmp_path)
    objective = build_objective(cfg, "cpu")
    base = objective.generator.backbone
    lora = add_lora(copy.deepcopy(base), 4, 4.0, ["inp", "blocks.0.1"])
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_()
    x, t = torch.randn(8, 2), torch.full((8,), 500)
    assert not torch.allclose(lora(x, t), base(x, t))
    with adapters_off(lora) as net:
        torch.testing.assert_close(net(x, t), base(x, t))
    assert not torch.allclose(lora(x, t), base(x, t))
    assert all(p.requires_grad == ("lora_" in n) for n, p in lora.named_parameters())


# ------------------------------------------------------------------ short runs
def test_short_lcm_run_learns_and_mcd_samples_with_segments(tmp_path):
    # 800 steps: the consistency map has not reached t = 999 yet, but 4-step sampling is already close
    cfg = make_config(tmp_path / "lcm", "train.max_steps=800", "train.lr_scheduler=constant")
    objective = build_objective(cfg, "cpu")
    untrained = evaluate_generator(lcm_sampler(objective.generator, objective, 4), n=1024, num_steps=4)
    generator, objective = train(cfg)
    trained = evaluate_generator(lcm_sampler(generator, objective, 4), n=1024, num_steps=4)
    assert untrained.sw2 > 0.3 and trained.sw2 < 0.15, (untrained, trained)
    cfg = make_config(tmp_path / "mcd", "train.max_steps=20", "objective.num_segments=4")
    generator, _ = train(cfg)
    assert isinstance(generator, OdeGenerator) and generator.timesteps == [999, 739, 499, 239]


def test_recipe_runs_stages_in_order_each_from_the_previous_export(tmp_path):
    """Hyper-SD's 8 -> 4 -> 2 -> 1 as a recipe: each stage starts from the previous stage's export (the EMA
    target restarts from it too), the final model samples at 1, 2, 4 and 8 steps, and a rerun skips every
    finished stage."""
    tree = load_config_tree(CONFIG, [f"train.output_dir={tmp_path}", "train.progress=false", "train.batch_size=64",
                                     "train.max_steps=30"])
    segments = [8, 4, 2, 1]
    tree["recipe"] = [{"name": f"s{n}", "set": {"objective.num_segments": n,
                                                **({"student.init": f"${{stages.s{prev}.final}}"} if prev else {})}}
                      for prev, n in zip([None, *segments], segments)]
    results = run_recipe(tree)
    assert [r["stage"] for r in results] == ["s8", "s4", "s2", "s1"] and all(r["steps"] == 30 for r in results)
    stages = plan_stages(tree)
    by_name = {s.name: s for s in stages}
    teacher = build_objective(make_config(tmp_path / "probe"), "cpu").teacher
    start = build_objective(stage_config(stages[-1], by_name), "cpu").generator.backbone.state_dict()
    handed_on = load_mlp_student(tmp_path / "s2" / "final", teacher).backbone.state_dict()
    final = load_mlp_student(tmp_path / "s1" / "final", teacher)
    assert all(torch.equal(start[k], handed_on[k]) for k in start)  # s1 started from s2's export
    assert any(not torch.equal(v, start[k]) for k, v in final.backbone.state_dict().items())  # and trained
    assert isinstance(load_mlp_student(tmp_path / "s4" / "final", teacher), OdeGenerator)
    grid = NoiseSchedule.vp().skipping_step_grid(50)
    for n in (1, 2, 4, 8):
        sampler = RenoiseGenerator(final.backbone, teacher, lcm_timesteps(grid, n), final.schedule,
                                   final.prediction_type)
        x = sampler.sample(torch.randn(256, 2), teacher.encode(torch.zeros(256)))
        assert x.shape == (256, 2) and torch.isfinite(x).all()
    rerun = run_recipe(tree)
    assert [r["stage"] for r in rerun] == ["s8", "s4", "s2", "s1"] and all(r["skipped"] for r in rerun)


# ------------------------------------------------------------------ acceptance on the analytic teacher
def distill(objective_class=Consistency, overrides=(), steps: int | None = None):
    """The preset's training (its steps, batch and LR schedule) through the objective's own phases."""
    cfg = load_config(CONFIG, list(overrides))
    objective = build(str(CONFIG), list(overrides))
    objective.__class__ = objective_class
    return optimize(objective, steps or cfg.train.max_steps, cfg.train.batch_size,
                    lr_scheduler=cfg.train.lr_scheduler)


def lcm_reports(objective):
    one = evaluate_generator(lcm_sampler(objective.generator, objective, 1), n=4096, seed=0)
    four = evaluate_generator(lcm_sampler(objective.generator, objective, 4), n=4096, seed=0, num_steps=4)
    return one, four


def passes(one, four) -> bool:
    """Issue 5's bounds: 1-step SW2 <= 0.07, ED <= 0.004, precision >= 0.80; 4-step SW2 <= 0.06, ED <= 0.003."""
    return (one.sw2 <= 0.07 and one.energy <= 0.004 and one.precision >= 0.80
            and four.sw2 <= 0.06 and four.energy <= 0.003)


@pytest.mark.slow
def test_lcm_gmm_acceptance():
    one, four = lcm_reports(distill())
    assert passes(one, four), (one, four)


@pytest.mark.slow
def test_mcd_4_segments_acceptance():
    objective = distill(overrides=["objective.num_segments=4"])
    four = evaluate_generator(objective.generator, n=4096, seed=0, num_steps=4)
    assert four.sw2 <= 0.06 and four.energy <= 0.003, four


@pytest.mark.slow
def test_guided_class_conditional_matches_teacher_cfg():
    objective = distill(overrides=["teacher.num_classes=4", "objective.w_min=2.0", "objective.w_max=2.0"])  # g = 3
    teacher = objective.teacher
    labels = teacher.sample_conditions(4096, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4096, 2, generator=torch.Generator().manual_seed(1))
    reference = teacher.sample(noise, teacher.encode(labels), 200, guidance=3.0)
    report = evaluate_generator(objective.generator, n=4096, seed=0, reference=reference, labels=labels)
    assert report.mode_tv <= 0.10, report


@pytest.mark.slow
@pytest.mark.parametrize("defect,steps", [
    (OnlineTargetWithGrad, None),  # fails narrowly (ED +17 %), so it gets the full budget
    (SolverTowardsNoise, 1500),  # fail by far (SW2 > 0.5 at 6000 steps): a quarter of the budget suffices
    (NoBoundaryScalings, 1500),
])
def test_defects_fail_the_bounds(defect, steps):
    one, four = lcm_reports(distill(defect, steps=steps))
    assert not passes(one, four), (one, four)


def test_trajectory_data_trains_on_the_teachers_own_states(tmp_path):
    """MLCM's data: states on cached teacher trajectories over the solver grid (no forward noising). The cached
    state at grid point t_i is the teacher's DDIM from the cached noise down to t_i, and a short run learns."""
    overrides = ["objective.data=trajectory", "objective.pairs.num=2048", "objective.lr=1e-3",
                 f"train.output_dir={tmp_path}"]
    objective = build(str(CONFIG), overrides)
    objective.prepare_data(str(tmp_path), "cpu")
    data = objective.dataset()
    states = data.tensors["states"]
    assert states.shape == (2048, 50, 2)
    grid = objective.grid.flip(0).tolist()  # 999, 979, ..., 19
    cond = objective.source.encode(data.tensors["cond_index"][:4])
    expected = list(objective.teacher.ode_states(data.tensors["noise"][:4], cond, grid[:11]))[10]
    torch.testing.assert_close(states[:4, 10], expected)  # the state at t = 799
    untrained = evaluate_generator(lcm_sampler(objective.generator, objective, 4), n=1024, num_steps=4)
    trained = optimize(objective, 800, 256)
    report = evaluate_generator(lcm_sampler(trained.generator, trained, 4), n=1024, num_steps=4)
    assert untrained.sw2 > 0.3 and report.sw2 < 0.15, (untrained, report)
    with pytest.raises(ValueError, match="pairs.guidance - 1"):
        build(str(CONFIG), ["objective.data=trajectory", "objective.w_min=2.0", "objective.w_max=2.0"])
