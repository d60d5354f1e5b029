"""BOOT (data-free bootstrapping on the signal ODE) on the analytic GMM teacher.

The algorithm's pieces against the teacher's own DDIM and the loss against its formulas; acceptance runs train
through the objective's own phases (stepdistill/training/lean.py) with the preset's steps, batch and LR schedule.

Measured (ring of 8, std 0.1, SD's schedule, MLP 128x3 predicting the signal, 3000 steps, batch 256, lr 1e-3
cosine, Delta 20; 4096 one-step samples at seed 0; the teacher's 1-step DDIM is SW2 0.683):
    seed 0 / 1 / 2: SW2 0.0775 / 0.0760 / 0.0747, ED 0.0071 / 0.0069 / 0.0065, precision 0.745 / 0.742 / 0.757;
    state at T/2 vs the teacher's 1000-step DDIM state from the same eps, RMS 0.0045 / 0.0045 / 0.0038;
    noise end g(eps, T) vs f(eps, T), RMS 0.0035 / 0.0042 / 0.0035. 1500 steps (seed 0): 0.0888, 0.0101, 0.691.
    Train CPU time 49-55 s per 3000 steps (one thread).
Defects (seed 0): delta with the wrong sign diverges (300 steps: SW2 2.3e4); the teacher queried at T - t
(500 steps): SW2 0.58, precision 0.00, T/2 RMS 0.31; no boundary loss: noise end RMS 0.089 at 1000 steps (SW2
0.104, precision 0.67, T/2 RMS 0.0041), 0.077 at 3000 (SW2 0.0757, ED 0.0067, precision 0.745, T/2 RMS 0.0020: it
fails on the boundary alone). A target that is not detached passes the bounds at 3000 steps (y_t with gradient:
SW2 0.0608, ED 0.0037, precision 0.839; y_t and the teacher's f(x_t) both with gradient: 0.0654, 0.0045, 0.824;
both trajectory RMS < 0.005): the loss has the same minimizer either way, so that defect is caught where it shows,
in the gradient (test_loss_is_the_formula_and_its_target_carries_no_gradient).
Guided (4 classes, w = 3): mode TV vs the teacher's 200-step CFG samples 0.048 at 3000 steps, 0.066 at 1000.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepdistill.config import ConfigError, load_config
from stepdistill.evaluation.distribution import evaluate_generator
from stepdistill.export import export_student, load_mlp_student
from stepdistill.objectives.boot import Boot
from stepdistill.students.signal import SignalGenerator
from stepdistill.training.lean import build, optimize

CONFIG = Path(__file__).parents[1] / "configs" / "boot_gmm.yaml"
N = 4096
MID = 499.0  # T/2 on SD's 1000-step axis


# ------------------------------------------------------------------ deliberate defects (test-only subclasses)
class WrongSign(Boot):
    """Defect: delta_t = 1 - exp(lambda_t - lambda_s) < 0, the step goes away from the teacher."""

    def delta(self, t, s):
        return -super().delta(t, s)


class TeacherAtReversedTime(Boot):
    """Defect: the teacher is queried at T - t, the noise and data ends swapped (a time-convention bug)."""

    def teacher_signal(self, x, t, cond):
        return super().teacher_signal(x, self.config.t_max - t, cond)


class TargetWithGradient(Boot):
    """Defect: y_t, the bootstrap's starting point, keeps its gradient (the target is not detached)."""

    def start_signal(self, eps, cond, t):
        return self.generator(eps, cond, t)


class GivenNoise(Boot):
    """Test-only: the loss reads this noise, so the formula can be recomputed on the same draws."""

    given: torch.Tensor

    def noise(self, batch_size):
        return self.given


# ------------------------------------------------------------------ the pieces against the teacher's DDIM
def closed_form_delta(schedule, t, s):
    """1 - exp(lambda_s - lambda_t) = 1 - (sigma_s alpha_t) / (alpha_s sigma_t); 1 at the clean end s = 0."""
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    return torch.where(s <= 0, 1.0, 1 - (s_s * a_t) / (a_s * s_t)).float()


def test_signal_step_is_exactly_the_teachers_ddim_step():
    """From the same eps, y_s = y_t + delta_t (f(x_t, t) - y_t) reproduces the teacher's 50-step DDIM
    trajectory state by state in signal space (eps cancels), down to its clean endpoint at s = 0."""
    objective = build(str(CONFIG), [])
    teacher = objective.teacher
    eps = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    cond = teacher.encode(torch.zeros(256, dtype=torch.long))
    grid = teacher.schedule.inference_timesteps(50)  # 999, 979, ..., 19, then the clean end
    states = list(teacher.ode_states(eps, cond, grid))
    ends = [*grid[1:], 0.0]
    for x_t, x_s, t, s in zip(states, states[1:], grid, ends):
        t_vec, s_vec = torch.full((256,), float(t)), torch.full((256,), float(s))
        a_t, sig_t = (v.float()[:, None] for v in teacher.schedule.alpha_sigma(t_vec))
        y_t = (x_t - sig_t * eps) / a_t
        y_s = objective.signal_step(y_t, objective.teacher_signal(x_t, t_vec, cond), t_vec, s_vec)
        if s > 0:
            a_s, sig_s = (v.float()[:, None] for v in teacher.schedule.alpha_sigma(s_vec))
            expected = (x_s - sig_s * eps) / a_s
        else:
            expected = x_s  # the clean endpoint: its signal is itself
        torch.testing.assert_close(y_s, expected, atol=2e-5, rtol=1e-5)
        delta = objective.delta(t_vec, s_vec)
        torch.testing.assert_close(delta, closed_form_delta(teacher.schedule, t_vec, s_vec))
        assert bool(((delta > 0) & (delta <= 1)).all())


def test_loss_is_the_formula_and_its_target_carries_no_gradient():
    """loss = mean(||g(eps, s) - SG[y_t + delta (f - y_t)]||^2 / delta^2) + w mean(||g(eps, T) - f(eps, T)||^2),
    recomputed from alpha/sigma on the same draws; its gradient is that of the detached-target formula, and a
    target that keeps y_t's gradient changes it."""
    overrides = ["objective.boundary_weight=0.5"]
    objective = build(str(CONFIG), overrides)
    objective.__class__ = GivenNoise
    g, teacher, schedule = objective.generator, objective.teacher, objective.teacher.schedule
    n = 512
    objective.given = torch.randn(n, 2, generator=torch.Generator().manual_seed(3))
    batch = {"cond_index": torch.zeros(n, dtype=torch.long)}
    cond = teacher.encode(batch["cond_index"])
    torch.manual_seed(7)
    losses = objective.loss("generator", batch, 0)
    losses["loss"].backward()
    grads = [p.grad.clone() for p in g.backbone.parameters()]
    g.backbone.zero_grad()

    torch.manual_seed(7)  # the same t draws
    t, s = objective.times(n)
    assert bool((s == (t - 20.0).clamp(min=0)).all()) and bool((s == 0).any())
    eps = objective.given
    with torch.no_grad():
        y_t = g(eps, cond, t)
        a_t, sig_t = (v.float()[:, None] for v in schedule.alpha_sigma(t))
        f_t = teacher.predict(a_t * y_t + sig_t * eps, t, cond).x0
        delta = closed_form_delta(schedule, t, s)[:, None]
        target = y_t + delta * (f_t - y_t)
        top = torch.full((n,), 999.0)
        f_top = teacher.predict(eps, top, cond).x0
    manual = ((g(eps, cond, s) - target) ** 2 / delta**2).mean() + 0.5 * ((g(eps, cond, top) - f_top) ** 2).mean()
    torch.testing.assert_close(losses["loss"], manual, rtol=1e-5, atol=1e-7)
    manual.backward()
    for p, expected in zip(g.backbone.parameters(), grads):
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)
    assert all(e.abs().sum() > 0 for e in grads)

    g.backbone.zero_grad()
    objective.__class__ = type("GivenNoiseWithGradient", (GivenNoise, TargetWithGradient), {})
    torch.manual_seed(7)
    objective.loss("generator", batch, 0)["loss"].backward()
    assert not torch.allclose(g.backbone.out[1].weight.grad, grads[-2])


def test_student_reads_the_same_noise_at_every_step_and_samples_at_the_clean_end(tmp_path):
    objective = build(str(CONFIG), [])
    g = objective.generator
    assert isinstance(g, SignalGenerator) and g.timesteps == [0.0] and g.prediction_type == "sample"
    eps = torch.randn(16, 2)
    cond = objective.teacher.encode(torch.zeros(16, dtype=torch.long))
    assert torch.equal(g.sample(eps, cond), g(eps, cond, torch.zeros(16)))
    t = torch.full((16,), 300.0)
    a, sig = (v.float()[:, None] for v in objective.teacher.schedule.alpha_sigma(t))
    torch.testing.assert_close(g.trajectory(eps, cond, t), a * g(eps, cond, t) + sig * eps)
    recipe = g.recipe()
    assert recipe.sampler == "ode" and recipe.timesteps == [0.0] and "BOOT" in recipe.extra["note"]
    export_student(g, objective.teacher, tmp_path / "export", "boot")
    reloaded = load_mlp_student(tmp_path / "export", objective.teacher)
    assert isinstance(reloaded, SignalGenerator)
    torch.testing.assert_close(reloaded.trajectory(eps, cond, t), g.trajectory(eps, cond, t))


def test_bad_configs_are_refused_with_the_key_and_the_fix():
    with pytest.raises(ConfigError, match=r"student.timesteps.*student.timesteps=\[0\]"):
        Boot.preflight(load_config(CONFIG, ["student.timesteps=[999]"]))
    with pytest.raises(ConfigError, match="objective.t_min"):
        Boot.preflight(load_config(CONFIG, ["objective.t_min=999", "objective.t_max=500"]))
    with pytest.raises(ConfigError, match="objective.step_size"):
        load_config(CONFIG, ["objective.step_size=0"])
    with pytest.raises(ValueError, match="VP teacher"):
        build(str(CONFIG), ["teacher.schedule=flow"]).check_compatible()


# ------------------------------------------------------------------ acceptance on the analytic teacher
def distill(objective_class=Boot, overrides=(), steps: int | None = None, seed: int = 0) -> Boot:
    """The preset's training (its steps, batch and LR schedule) through the objective's own phases."""
    cfg = load_config(CONFIG, list(overrides))
    objective = build(str(CONFIG), list(overrides), seed=seed)
    objective.__class__ = objective_class
    return optimize(objective, steps or cfg.train.max_steps, cfg.train.batch_size, seed=seed,
                    lr_scheduler=cfg.train.lr_scheduler)


@torch.no_grad()
def trajectory_errors(objective: Boot) -> dict[str, float]:
    """Per-sample RMS distances from the same eps: the student's state x_t at T/2 vs the teacher's 1000-step DDIM
    state there, and the student's noise end g(eps, T) vs the teacher's f(eps, T) (the boundary)."""
    teacher, g = objective.teacher, objective.generator
    eps = torch.randn(N, 2, generator=torch.Generator().manual_seed(5))
    cond = teacher.encode(torch.zeros(N, dtype=torch.long))
    grid = [999.0 - i for i in range(int(999 - MID) + 1)]  # one-timestep DDIM steps 999 -> 499
    x_mid = list(teacher.ode_states(eps, cond, grid))[-2]  # the state at 499 (the last is the clean end)
    top = torch.full((N,), float(objective.config.t_max))
    rms = lambda a, b: float((a - b).pow(2).sum(1).mean().sqrt())  # noqa: E731
    return {"mid": rms(g.trajectory(eps, cond, torch.full((N,), MID)), x_mid),
            "boundary": rms(g(eps, cond, top), teacher.predict(eps, top, cond).x0)}


def passes(report, errors: dict[str, float]) -> bool:
    """Issue 15's bounds (one step, 4096 samples: SW2 <= 0.10, ED <= 0.012, precision >= 0.55) and the trajectory's:
    its state at T/2 within MID_BOUND of the teacher's DDIM state from the same eps, its noise end within
    BOUNDARY_BOUND of the teacher's f(eps, T)."""
    return (report.sw2 <= 0.10 and report.energy <= 0.012 and report.precision >= 0.55
            and errors["mid"] <= MID_BOUND and errors["boundary"] <= BOUNDARY_BOUND)


MID_BOUND, BOUNDARY_BOUND = 0.01, 0.02  # measured at the full budget, 3 seeds: <= 0.0045 and <= 0.0042


@pytest.mark.slow
def test_boot_gmm_acceptance():
    objective = distill()
    report, errors = evaluate_generator(objective.generator, n=N, seed=0), trajectory_errors(objective)
    assert passes(report, errors), (report, errors)


@pytest.mark.slow
def test_guided_class_conditional_matches_teacher_cfg():
    """A third of the budget is enough (measured TV 0.066; 0.048 at the full 3000 steps)."""
    objective = distill(overrides=["teacher.num_classes=4", "objective.guidance=3.0"], steps=1000)
    teacher = objective.teacher
    labels = teacher.sample_conditions(N, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(N, 2, generator=torch.Generator().manual_seed(1))
    reference = teacher.sample(noise, teacher.encode(labels), 200, guidance=3.0)
    report = evaluate_generator(objective.generator, n=N, seed=0, reference=reference, labels=labels)
    assert report.mode_tv <= 0.20, report


@pytest.mark.slow
@pytest.mark.parametrize("defect,steps", [(WrongSign, 300), (TeacherAtReversedTime, 500)])
def test_defects_fail_the_bounds(defect, steps):
    """Both fail by far within a fraction of the budget (measured: see the module docstring)."""
    objective = distill(defect, steps=steps)
    report, errors = evaluate_generator(objective.generator, n=N, seed=0), trajectory_errors(objective)
    assert not passes(report, errors), (report, errors)


@pytest.mark.slow
def test_without_the_boundary_loss_the_noise_end_drifts():
    """The defect fails on the boundary alone: at the full budget its one-step distribution and its state at T/2
    pass (see the module docstring). A third of the budget shows the drift (measured RMS 0.089, bound 0.02)."""
    objective = distill(overrides=["objective.boundary_weight=0"], steps=1000)
    assert trajectory_errors(objective)["boundary"] > BOUNDARY_BOUND
