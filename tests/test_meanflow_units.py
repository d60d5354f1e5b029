"""MeanFlow's pieces against closed forms: the identity target on one Gaussian, where the average velocity is known
exactly, with the wrong tangents and sign that must break it; the student's zero-initialized interval embedding
(a flow init is reproduced at step 0 for every r); the folded export reloads as the same sampler."""
from __future__ import annotations

import pytest
import torch

from stepdistill.export import load_mlp_student
from stepdistill.objectives.continuous.meanflow import MeanFlow
from stepdistill.objectives.continuous.meanflow_student import TimeAndInterval
from stepdistill.training.lean import build

PRESET = "configs/meanflow_gmm.yaml"
ONE_GAUSSIAN = ["teacher.num_modes=1"]  # the ring's single mode: mean (1, 0), std 0.1


def gaussian_flow(objective):
    """(u(z, r, t), v(z, t)) in closed form for x ~ N(mu, s^2 I), z_t = (1 - t) x + t eps: the marginals are
    N((1 - t) mu, sigma_t^2 I), sigma_t^2 = (1 - t)^2 s^2 + t^2, and the ODE is affine,
    z_r = (1 - r) mu + (sigma_r / sigma_t)(z_t - (1 - t) mu), so u = (z_t - z_r) / (t - r)."""
    mixture = objective.teacher.mixture
    mu, s = mixture.means[0].to(torch.float32), float(mixture.stds[0])

    def sigma(t):
        return ((1 - t) ** 2 * s**2 + t**2).sqrt()[:, None]

    def u(z, r, t):
        z_r = (1 - r)[:, None] * mu + sigma(r) / sigma(t) * (z - (1 - t)[:, None] * mu)
        return (z - z_r) / (t - r)[:, None]

    def v(z, t):
        dsigma = ((t - 1) * s**2 + t)[:, None] / sigma(t)
        return -mu + dsigma / sigma(t) * (z - (1 - t)[:, None] * mu)

    return u, v


class TangentAlongR(MeanFlow):
    """Defect: the tangent differentiates along r instead of t, (v, 1, 0)."""

    def tangents(self, v, r, t):
        return v, torch.ones_like(r), torch.zeros_like(t)


class TangentWithoutTime(MeanFlow):
    """Defect: the partial derivative in t left out, (v, 0, 0)."""

    def tangents(self, v, r, t):
        return v, torch.zeros_like(r), torch.zeros_like(t)


class FlippedTangent(MeanFlow):
    """Defect: the tangent's sign flipped, (-v, 0, -1): du/dt backwards in time."""

    def tangents(self, v, r, t):
        return -v, torch.zeros_like(r), -torch.ones_like(t)


class FlippedInterval(MeanFlow):
    """Defect: u_tgt = v + (t - r) du/dt."""

    def identity_target(self, v, dudt, r, t):
        return super().identity_target(v, -dudt, r, t)


def identity_residual(cls):
    """max |u_tgt - u| / max |u| of the identity target built on the exact u (in place of the student)."""
    objective = build(PRESET, ONE_GAUSSIAN)
    objective.__class__ = cls
    u, _ = gaussian_flow(objective)
    objective.generator.average_velocity = lambda z, cond, r, t: u(z, r, t)
    g = torch.Generator().manual_seed(0)
    n = 512
    t = 0.1 + 0.85 * torch.rand(n, generator=g)
    r = t * 0.8 * torch.rand(n, generator=g)  # t - r >= 0.02: the closed form's own rounding stays small
    z = objective.generator.schedule.add_noise(objective.teacher.mixture.sample(n, generator=g),
                                               torch.randn(n, 2, generator=g),
                                               objective.generator.schedule.flow_timestep(t))
    cond = objective.teacher.encode(torch.zeros(n, dtype=torch.long))
    v = objective.teacher_velocity(z, t, cond)
    target = objective.target(z, r, t, v, cond)
    assert not target.requires_grad
    exact = u(z, r, t)
    return float((target - exact).abs().max() / exact.abs().max())


def test_teacher_velocity_is_the_closed_form_and_the_limit_of_u_at_r_equal_t():
    objective = build(PRESET, ONE_GAUSSIAN)
    u, v = gaussian_flow(objective)
    n = 256
    t = 0.05 + 0.9 * torch.rand(n, dtype=torch.float64)
    z = torch.randn(n, 2, dtype=torch.float64)
    cond = objective.teacher.encode(torch.zeros(n, dtype=torch.long))
    torch.testing.assert_close(objective.teacher_velocity(z.float(), t.float(), cond), v(z, t).float(),
                               atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(u(z, t - 1e-7, t), v(z, t), atol=1e-5, rtol=1e-5)


def test_a_vp_teacher_gives_the_flow_teachers_velocity_inside_its_sigma_range():
    """The same mixture as a VP teacher (SD's scaled_linear, eps) read through TrigFlow at the flow state: the flow
    velocity of the exact flow teacher wherever SD's sigma range reaches (flow times 0.028-0.936; measured max
    abs difference 2e-6 at |v| up to 14), and not beyond it (t = 0.001: the VP teacher stops at its sigma_min)."""
    flow = build(PRESET, [])
    vp = build(PRESET, ["teacher.schedule=vp", "student.schedule=flow"])
    n = 512
    g = torch.Generator().manual_seed(0)
    t, z = 0.03 + 0.9 * torch.rand(n, generator=g), torch.randn(n, 2, generator=g)
    cond = flow.teacher.encode(torch.zeros(n, dtype=torch.long))
    torch.testing.assert_close(vp.teacher_velocity(z, t, cond), flow.teacher_velocity(z, t, cond),
                               atol=1e-4, rtol=1e-5)
    t = torch.full((n,), 0.001)
    assert (vp.teacher_velocity(z, t, cond) - flow.teacher_velocity(z, t, cond)).abs().max() > 1.0


def test_identity_target_is_the_exact_average_velocity_on_one_gaussian():
    """Measured: the relative residual 1.2e-7 (float32) with the tangent (v, 0, 1)."""
    assert identity_residual(MeanFlow) < 1e-4


def test_at_r_equal_t_the_target_is_the_teachers_velocity():
    """r = t: (t - r) du/dt vanishes and the loss is flow matching onto the teacher (test_meanflow_gmm shows that
    training only there, objective.ratio=0, fails the one-step bound)."""
    objective = build(PRESET, [])
    n = 64
    z, t = torch.randn(n, 2), torch.rand(n)
    cond = objective.teacher.encode(torch.zeros(n, dtype=torch.long))
    v = objective.teacher_velocity(z, t, cond)
    torch.testing.assert_close(objective.target(z, t, t, v, cond), v, atol=0, rtol=0)


def test_the_jvp_runs_in_fp32_under_a_bf16_autocast():
    """The target does not change when the training step runs under bf16 autocast (mixed_precision=bf16)."""
    objective = build(PRESET, [])
    n = 64
    z, t = torch.randn(n, 2), 0.2 + 0.7 * torch.rand(n)
    r = 0.5 * t
    cond = objective.teacher.encode(torch.zeros(n, dtype=torch.long))
    v = objective.teacher_velocity(z, t, cond)
    expected = objective.target(z, r, t, v, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert objective.generator.average_velocity(z, cond, r, t).dtype == torch.float32  # teacher.call casts
        torch.testing.assert_close(objective.target(z, r, t, v, cond), expected, atol=0, rtol=0)


@pytest.mark.parametrize("defect", [TangentAlongR, TangentWithoutTime, FlippedTangent, FlippedInterval])
def test_wrong_tangent_or_sign_breaks_the_identity(defect):
    """Measured relative residuals: along r 1.38, without d/dt 0.74, flipped tangent 0.37, flipped (t - r) 0.37."""
    assert identity_residual(defect) > 0.1


def test_interval_embedding_starts_at_zero_so_a_flow_init_is_reproduced_for_every_r(tmp_path):
    """A MeanFlow student started from a flow student's export (reflow-style init, student.init) computes that
    flow's velocity at step 0 whatever r is (on the flow's own time axis, student_time=teacher); after one update
    the interval embedding has moved (it gets gradient)."""
    flow = build("configs/reflow_gmm.yaml", [])
    flow.export(flow.generator, tmp_path / "rf")
    objective = build(PRESET, [f"student.init={tmp_path / 'rf'}", "objective.student_time=teacher"])
    embedder = objective.generator.backbone.time_mlp
    assert isinstance(embedder, TimeAndInterval)
    n = 64
    z, t = torch.randn(n, 2), torch.rand(n)
    cond = objective.teacher.encode(torch.zeros(n, dtype=torch.long))
    expected = flow.generator.velocity(z, cond, 1000 * t)
    for r in (t, t * torch.rand(n), torch.zeros(n)):
        torch.testing.assert_close(objective.generator.average_velocity(z, cond, r, t), expected)
    objective.loss("generator", {"cond_index": torch.zeros(256, dtype=torch.long)}, 0)["loss"].backward()
    assert embedder.interval.linear_2.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in flow.generator.parameters())


@pytest.mark.parametrize("steps", [1, 2])
def test_folded_export_reloads_as_the_same_sampler(steps, tmp_path):
    """The export folds e(T / N) into the time embedder's bias: the reloaded stock MLP with N Euler steps samples
    what the two-time student samples with N MeanFlow steps."""
    objective = build(PRESET, [f"objective.sample_steps={steps}"])
    with torch.no_grad():  # a non-zero interval embedding, so that the fold matters
        for p in objective.generator.backbone.time_mlp.interval.parameters():
            p.normal_(0, 0.5)
    folder = objective.export(objective.generator, tmp_path / "final")
    generator = load_mlp_student(folder, objective.teacher)
    assert generator.timesteps == [1.0, 0.5][:steps] and generator.recipe().sampler == "ode"  # student_time=unit
    noise = torch.randn(128, 2)
    cond = objective.teacher.encode(torch.zeros(128, dtype=torch.long))
    expected = objective.generator.sample(noise, cond)
    torch.testing.assert_close(generator.sample(noise, cond), expected, atol=1e-5, rtol=1e-5)
    other = objective.generator.sample(noise, cond, num_steps=3 - steps)
    assert (other - expected).abs().max() > 1e-3  # the fold is specific to N
