"""sCD (continuous-time consistency distillation, stepdistill/objectives/continuous/scd.py) on the analytic GMM teacher.

The pieces: Algorithm 1's tangent vanishes for an exact consistency function and not for a broken one, the JVP is
cos s sin s sigma_d dF/ds, only the student and the weighting learn, the weighting's own phase has the joint loss's
gradient, CFG is baked into the teacher's velocity. The acceptance runs train the preset's recipe (`pretrain`: the
student as a diffusion model of the mixture, the sCD paper's theta <- theta_pretrain; then `scd`) through the
objectives' own phases (stepdistill/training/lean.py), 4096 samples per metric.
Measured (seed 0; the start, a student fitted to the teacher for 3000 steps: 1/2-step SW2 0.68 / 0.35, precision
0.00 / 0.08):
  sCD          1 step SW2 0.292, ED 0.132, precision 0.24; 2 steps SW2 0.163, ED 0.038, precision 0.80
  nearby settings (weighting lr 2e-4 or 1e-2, prior weight on or off), 4500-6000 steps: 1 step SW2 0.20-0.32,
  precision 0.24-0.32; 2 steps SW2 0.10-0.18, precision 0.71-0.89
  defects      tangent sign flipped: diverges (1 step SW2 5e7); sigma_d dropped from the VP -> TrigFlow time
               conversion: 1 step SW2 0.372, precision 0.29, 2 steps SW2 0.246, precision 0.54 (misses the 2-step
               bounds); no tangent normalization: 1 step SW2 0.289, precision 0.25, 2 steps SW2 0.139, precision
               0.80, within the bounds: in 2-D the raw tangent's norm at the pretrained start spans 0.35 (median)
               to 3.1 (max) over the proposal, no spikes for the normalization to tame (the paper's case is high-dimensional), so it is
               checked as a unit (the normalized target's norm stays below 1), not as a training defect.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trigflow_utils import train_stage

from stepdistill.config import load_config_tree
from stepdistill.evaluation.distribution import evaluate_generator
from stepdistill.jvp import jvp
from stepdistill.objectives import build_objective
from stepdistill.objectives.continuous.scd import SCD
from stepdistill.recipes import plan_stages
from stepdistill.recipes.runner import stage_config
from stepdistill.schedules import NoiseSchedule, _bcast
from stepdistill.teachers.gmm import GaussianMixture
from stepdistill.training.lean import optimize

PRESET = Path(__file__).parents[1] / "configs" / "scd_gmm.yaml"
SIGMA_D = 0.5


# ------------------------------------------------------------------ deliberate defects (test-only subclasses)
class FlippedTangent(SCD):
    """Defect: the tangent's sign flipped (F pushed against df/ds)."""

    def tangent(self, *args, **kwargs):
        return -super().tangent(*args, **kwargs)


class WithoutSigmaData(NoiseSchedule):
    """Defect: the VP -> TrigFlow time conversion reads tan s as the teacher's sigma / alpha (sigma_d dropped)."""

    def from_trigflow(self, s, sigma_d):
        return super().from_trigflow(s, 1.0)


def stage_cfg(stage: str, root: Path, *overrides: str):
    tree = load_config_tree(PRESET, [f"train.output_dir={root}", *overrides])
    stages = {s.name: s for s in plan_stages(tree)}
    return stage_config(stages[stage], stages), stages[stage]


def scd_objective(root: Path, objective: dict | None = None, teacher: dict | None = None) -> SCD:
    """The `scd` stage's objective with a fresh MLP (the pieces do not need the pretrained one)."""
    cfg, _ = stage_cfg("scd", root)
    cfg.student.init = ""
    for section, values in (("objective", objective or {}), ("teacher", teacher or {})):
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    torch.manual_seed(0)
    return build_objective(cfg, "cpu")


# ------------------------------------------------------------------ pieces of Algorithm 1
def single_gaussian_consistency(mu: torch.Tensor, std: float):
    """The exact consistency function of one Gaussian N(mu, std^2 I) under TrigFlow: the ODE maps x_s to
    mu + std (x_s - cos s mu) / sqrt(cos^2 s std^2 + sin^2 s sigma_d^2); as sigma_d F = (cos s x - f) / sin s."""
    def velocity(x, s):
        c, sn = _bcast(s.cos(), x), _bcast(s.sin(), x)
        f = mu + std * (x - c * mu) / (c * c * std**2 + sn * sn * SIGMA_D**2).sqrt()
        return (c * x - f) / sn
    return velocity


def test_tangent_vanishes_for_the_exact_consistency_function(tmp_path):
    """g = cos s df/ds is 0 along the teacher's ODE for the exact f (r = 1), and far from 0 when the JVP's time
    tangent has the wrong sign or its cos s sin s factor is left out."""
    objective = scd_objective(tmp_path)
    mu, std, n = torch.tensor([[0.6, -0.3]], dtype=torch.float64), 0.2, 32
    mixture = GaussianMixture(mu, torch.tensor([std], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    s = torch.linspace(0.06, 1.53, n, dtype=torch.float64)
    x = _bcast(s.cos(), mu) * mixture.sample(n, generator=g).double() + \
        SIGMA_D * _bcast(s.sin(), mu) * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x0 = mixture.posterior_mean(x, s.cos(), SIGMA_D * s.sin(), torch.ones(n, 1, dtype=torch.float64))
    dxds = (_bcast(s.cos(), x) * x - x0) / _bcast(s.sin(), x)  # the teacher's velocity
    velocity = single_gaussian_consistency(mu, std)
    cs = s.cos() * s.sin()
    v, dv = jvp(velocity, (x, s), (_bcast(cs, x) * dxds, cs))
    assert objective.tangent(x, s, v, dv, dxds, step=10**9).abs().max() < 1e-12
    _, dv_back = jvp(velocity, (x, s), (_bcast(cs, x) * dxds, -cs))  # time running backwards
    assert objective.tangent(x, s, v, dv_back, dxds, step=10**9).norm(dim=1).median() > 0.1
    _, dv_plain = jvp(velocity, (x, s), (dxds, torch.ones_like(s)))  # dF/ds without cos s sin s
    assert objective.tangent(x, s, v, dv_plain, dxds, step=10**9).norm(dim=1).median() > 0.1


def test_tangent_warmup_and_normalization(tmp_path):
    objective = scd_objective(tmp_path, {"tangent_warmup": 100})
    x, s = torch.randn(4, 2), torch.full((4,), 0.8, dtype=torch.float64)
    v, dv, dxds = (torch.randn(4, 2, dtype=torch.float64) for _ in range(3))
    cos, sin = s.cos()[:, None], s.sin()[:, None]
    torch.testing.assert_close(objective.tangent(x, s, v, dv, dxds, step=0), -cos**2 * (v - dxds))
    torch.testing.assert_close(objective.tangent(x, s, v, dv, dxds, step=50),
                               -cos**2 * (v - dxds) - 0.5 * (cos * sin * x.double() + dv))
    g = objective.normalize(100 * torch.randn(8, 2, dtype=torch.float64))
    assert (g.norm(dim=1) < 1).all() and (g.norm(dim=1) > 0.99).all()


def test_jvp_is_the_scaled_time_derivative_of_the_student(tmp_path):
    """The forward-mode output along cos s sin s (dx/ds, 1) is cos s sin s d/ds sigma_d F(x_s, s) (sCM Eq. 8's
    rearrangement), against reverse-mode's double-backward JVP of the same student (an independent route)."""
    objective = scd_objective(tmp_path)
    cond = objective.source.encode(torch.zeros(16, dtype=torch.long))
    s = torch.linspace(0.1, 1.5, 16, dtype=torch.float64)
    x_s = 0.7 * torch.randn(16, 2)
    dxds = objective.teacher_velocity(x_s, s, cond)
    velocity = objective.student_velocity(cond.fields)
    cs = s.cos() * s.sin()
    tangents = ((_bcast(cs, x_s) * dxds).float(), cs)
    _, dv = jvp(velocity, (x_s, s), tangents)
    _, reference = torch.autograd.functional.jvp(velocity, (x_s, s), tangents)
    torch.testing.assert_close(dv, reference, rtol=1e-5, atol=1e-6)


def test_proposal_is_the_papers_log_normal_within_the_teachers_times(tmp_path):
    objective = scd_objective(tmp_path)
    torch.manual_seed(0)
    s = objective.sample_times(20000)
    lo, hi = objective.time_range
    assert lo == pytest.approx(0.0583, abs=1e-4) and hi == pytest.approx(1.5366, abs=1e-4)
    assert float(s.min()) >= lo and float(s.max()) <= hi
    log_sigma = (SIGMA_D * s.tan()).log()
    inside = (s > lo) & (s < hi)
    assert float(log_sigma.median()) == pytest.approx(-1.0, abs=0.05)  # log(sigma_d tan s) ~ N(-1.0, 1.4)
    assert float(log_sigma[inside].std()) == pytest.approx(1.4, abs=0.15)  # clamped tails cut it a little


def test_only_the_student_and_the_weighting_learn_each_in_its_phase(tmp_path):
    """The generator phase moves the student only (the weighting enters detached); the weighting phase has the
    gradient of the joint loss exp(w) e - w in w, e = prior x ||F_theta - F- - g||^2 / D."""
    objective = scd_objective(tmp_path)
    batch = {"cond_index": torch.zeros(64, dtype=torch.long)}
    torch.manual_seed(1)
    losses = objective.loss("generator", batch, 5000)
    losses["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.generator.backbone.parameters())
    assert all(p.grad is None for p in objective.weighting.parameters())
    tau, error = objective._last
    objective.zero_grad()
    objective.loss("weighting", batch, 5000)["loss"].backward()
    got = objective.weighting.linear.bias.grad.clone()
    w = objective.weighting(tau).double()
    assert torch.allclose(got, ((error * w.exp() - 1).mean()).float().reshape(1), atol=1e-6)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in objective.generator.backbone.parameters())


def test_teacher_guidance_is_baked_into_the_velocity(tmp_path):
    """Class-conditional teacher at CFG 3: the velocity is uncond + 3 (cond - uncond) of the two branches'
    velocities (the conversion is affine in the raw output)."""
    objective = scd_objective(tmp_path, {"guidance": 3.0}, {"num_classes": 4})
    labels = torch.tensor([0, 1, 2, 3])
    cond = objective.source.encode(labels)
    s = torch.tensor([0.3, 0.7, 1.0, 1.4], dtype=torch.float64)
    x = torch.randn(4, 2)
    guided = objective.teacher_velocity(x, s, cond)
    teacher = objective.teacher
    branch = [objective.velocity(lambda xx, tau, f=f: teacher.model_output(xx, tau, f), None)(x, s)
              for f in (cond.null, cond.fields)]
    torch.testing.assert_close(guided, branch[0] + 3.0 * (branch[1] - branch[0]), rtol=1e-6, atol=1e-6)
    assert objective.reference_guidance == 3.0


# ------------------------------------------------------------------ acceptance on the analytic teacher
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """Stage `pretrain` of the preset (teacher score matching, its steps), exported where `scd` starts from."""
    root = tmp_path_factory.mktemp("scd_gmm")
    cfg, stage = stage_cfg("pretrain", root)
    train_stage(cfg, stage.final)
    return root


def distill(root: Path, objective_class=SCD, schedule_class=None, steps: int | None = None) -> SCD:
    """Stage `scd` of the preset (its steps, batch and LR schedule) from the pretrained student."""
    cfg, _ = stage_cfg("scd", root)
    torch.manual_seed(0)
    objective = build_objective(cfg, "cpu")
    objective.__class__ = objective_class
    if schedule_class is not None:
        objective.teacher.schedule.__class__ = schedule_class
    return optimize(objective, steps or cfg.train.max_steps, cfg.train.batch_size, 0, cfg.train.lr_scheduler)


def reports(objective: SCD):
    one = evaluate_generator(objective.generator, n=4096, seed=0, num_steps=1)
    two = evaluate_generator(objective.generator, n=4096, seed=0, num_steps=2)
    return one, two


def passes(one, two) -> bool:
    """Bounds from the measured runs (module docstring) with room for their spread: 1 step SW2 <= 0.40 and
    precision >= 0.20 (start: 0.68 / 0.00); 2 steps SW2 <= 0.20 and precision >= 0.60 (start: 0.35 / 0.08); 2 steps
    better than 1 step in SW2 and precision."""
    return (one.sw2 <= 0.40 and one.precision >= 0.20 and two.sw2 <= 0.20 and two.precision >= 0.60
            and two.sw2 < one.sw2 and two.precision > one.precision)


@pytest.mark.slow
def test_scd_gmm_acceptance(pretrained):
    one, two = reports(distill(pretrained))
    assert passes(one, two), (one, two)


@pytest.mark.slow
@pytest.mark.parametrize("defect,schedule", [(FlippedTangent, None), (SCD, WithoutSigmaData)])
def test_defects_fail_the_bounds(pretrained, defect, schedule):
    one, two = reports(distill(pretrained, defect, schedule))
    assert not passes(one, two), (one, two)
