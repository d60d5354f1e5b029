"""TrigFlow (sCM, arXiv 2410.11081 §2) as a view of our VP and flow teachers (stepdistill/schedules.py): the time
conversion is exact, every teacher form of the analytic mixture gives the mixture's own TrigFlow velocity, and the
time tangent that sCD's JVP takes flows through the conversion, also through real tiny UNet / MMDiT backbones."""
from __future__ import annotations

import math

import pytest
import torch

from stepdistill.jvp import jvp
from stepdistill.schedules import NoiseSchedule, _bcast
from stepdistill.teachers.gmm import GaussianMixture, GMMTeacher
from stepdistill.teachers.loading import teacher_class
from stepdistill.teachers.tiny import build_tiny_pipeline

SIGMA_D = 0.5
SCHEDULES = {"vp_eps": NoiseSchedule.vp(), "vp_v": NoiseSchedule.vp(prediction_type="v_prediction"),
             "flow": NoiseSchedule.flow(3.0)}


def trig_times(schedule: NoiseSchedule, n: int = 64) -> torch.Tensor:
    """Times spread over the teacher's range (a flow's timestep 0 is clean data: from timestep 1)."""
    lo, hi = schedule.timestep_range()
    ends = schedule.trigflow_time(torch.tensor([max(lo, 1.0), hi]), SIGMA_D)
    return torch.linspace(float(ends[0]), float(ends[1]), n, dtype=torch.float64)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_time_conversion_is_exact(name):
    """c_in x_s = c_in cos s x0 + c_in sigma_d sin s eps is the teacher's alpha_tau x0 + sigma_tau eps, and the
    conversion inverts `trigflow_time`; at SD's ends the TrigFlow times are 0.0583 and 1.5366 (sigma_d 0.5)."""
    schedule = SCHEDULES[name]
    s = trig_times(schedule)
    tau, c_in = schedule.from_trigflow(s, SIGMA_D)
    alpha, sigma = schedule.alpha_sigma(tau)
    torch.testing.assert_close(c_in * s.cos(), alpha, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_in * SIGMA_D * s.sin(), sigma, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(schedule.trigflow_time(tau, SIGMA_D), s, rtol=1e-12, atol=1e-12)
    if name == "vp_eps":
        ends = schedule.trigflow_time(torch.tensor([0.0, 999.0]), SIGMA_D)
        assert ends.tolist() == pytest.approx([0.0583, 1.5366], abs=1e-4)
        assert float(schedule.from_trigflow(torch.tensor(1.1), SIGMA_D)[0]) == pytest.approx(348.56, abs=0.01)


def mixture_velocity(mixture: GaussianMixture, x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """dx_s/ds of the mixture in TrigFlow coordinates directly: alpha = cos s, sigma = sigma_d sin s."""
    x0 = mixture.posterior_mean(x_s, s.cos(), SIGMA_D * s.sin(), mixture.weights_for(None, len(x_s)))
    return (_bcast(s.cos(), x_s) * x_s.double() - x0) / _bcast(s.sin(), x_s)


def teacher_velocity(teacher: GMMTeacher, x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The teacher's own prediction at (c_in x_s, tau(s)), converted."""
    tau, c_in = teacher.schedule.from_trigflow(s, SIGMA_D)
    out = teacher.model_output((_bcast(c_in, x_s) * x_s).float(), tau, {})
    return teacher.schedule.trigflow_velocity(out, x_s, s, SIGMA_D)


def noisy_states(mixture: GaussianMixture, s: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x0 = mixture.sample(len(s), generator=g).double()
    z = SIGMA_D * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return (_bcast(s.cos(), x0) * x0 + _bcast(s.sin(), x0) * z).float()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_teacher_form_gives_the_mixtures_trigflow_velocity(name):
    """The analytic teacher as VP eps, VP v and flow model: its converted prediction is the TrigFlow velocity of the
    mixture (to the fp32 of the teacher's output); x0 from that velocity (the consistency form) is its x0."""
    teacher = GMMTeacher(GaussianMixture.ring(), SCHEDULES[name])
    s = trig_times(teacher.schedule)
    x_s = noisy_states(teacher.mixture, s)
    expected = mixture_velocity(teacher.mixture, x_s, s)
    velocity = teacher_velocity(teacher, x_s, s)
    torch.testing.assert_close(velocity, expected, rtol=1e-4, atol=2e-5)
    tau, c_in = teacher.schedule.from_trigflow(s, SIGMA_D)
    x0 = teacher.predict((_bcast(c_in, x_s) * x_s).float(), tau, teacher.encode(torch.zeros(len(s))), dtype=torch.float64).x0
    torch.testing.assert_close(NoiseSchedule.trigflow_x0(velocity, x_s, s), x0, rtol=1e-4, atol=2e-5)


class WithoutSigmaData(NoiseSchedule):
    """Defect: tan s read as the teacher's sigma / alpha (sigma_d dropped from the time conversion)."""

    def from_trigflow(self, s, sigma_d):
        return super().from_trigflow(s, 1.0)


class SigmaSquared(NoiseSchedule):
    """Defect: sigma^2 / alpha^2 matched to sigma_d tan s instead of sigma / alpha."""

    def from_trigflow(self, s, sigma_d):
        s = torch.as_tensor(s).to(torch.float64)
        return super().from_trigflow(torch.atan(torch.tan(s) * sigma_d), sigma_d)


@pytest.mark.parametrize("defect", [WithoutSigmaData, SigmaSquared])
def test_a_wrong_time_conversion_misses_the_velocity(defect):
    teacher = GMMTeacher(GaussianMixture.ring(), NoiseSchedule.vp())
    s = trig_times(teacher.schedule)
    x_s = noisy_states(teacher.mixture, s)
    teacher.schedule.__class__ = defect
    error = (teacher_velocity(teacher, x_s, s) - mixture_velocity(teacher.mixture, x_s, s)).norm(dim=1)
    assert error.median() > 0.05, error


def exact_vp_velocity(mixture: GaussianMixture, schedule: NoiseSchedule):
    """(x_s, s) -> the VP eps teacher's converted velocity, all in float64 (the GMM teacher rounds its output to
    fp32, too coarse for a finite difference)."""
    def velocity(x_s, s):
        tau, c_in = schedule.from_trigflow(s, SIGMA_D)
        x = _bcast(c_in, x_s) * x_s
        alpha, sigma = schedule.alpha_sigma(tau)
        x0 = mixture.posterior_mean(x, alpha, sigma, mixture.weights_for(None, len(x)))
        eps = (x - _bcast(alpha, x) * x0) / _bcast(sigma, x)
        return schedule.trigflow_velocity(eps, x_s, s, SIGMA_D)
    return velocity


def test_time_tangent_flows_through_the_vp_conversion():
    """d/ds along (dx, 1) by forward mode equals a float64 central difference: tau(s) is differentiable (a
    nearest-index lookup would leave out the time derivative, as a detached tau shows)."""
    schedule, mixture = NoiseSchedule.vp(), GaussianMixture.ring()
    s = trig_times(schedule, 16)[1:-1]
    x_s = noisy_states(mixture, s).double()
    dx = torch.randn(x_s.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    velocity = exact_vp_velocity(mixture, schedule)
    _, tangent = jvp(velocity, (x_s, s), (dx, torch.ones_like(s)))
    h = 1e-6
    numeric = (velocity(x_s + h * dx, s + h) - velocity(x_s - h * dx, s - h)) / (2 * h)
    torch.testing.assert_close(tangent, numeric, rtol=1e-5, atol=1e-5)

    class DetachedTime(NoiseSchedule):
        def from_trigflow(self, s, sigma_d):
            tau, c_in = super().from_trigflow(s, sigma_d)
            return tau.detach(), c_in

    schedule.__class__ = DetachedTime
    _, detached = jvp(velocity, (x_s, s), (dx, torch.ones_like(s)))
    assert (detached - numeric).norm(dim=1).median() > 0.1


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_tangent_through_tiny_backbones_matches_finite_differences(kind):
    """sCD's student function (x_s, s) -> velocity through a real UNet (VP eps, attention) and SD3's MMDiT
    (flow): forward mode on SDPA's math kernel equals a central difference of the same fp32 function."""
    teacher = teacher_class(kind)(build_tiny_pipeline(kind), kind)
    schedule, n = teacher.schedule, 2
    fields = teacher.encode(["a red square", "a cat"]).fields
    s = torch.tensor([0.4, 1.2], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x_s = SIGMA_D * torch.randn((n, *teacher.sample_shape), generator=g)
    dx = torch.randn(x_s.shape, generator=g)

    def velocity(x, t):
        tau, c_in = schedule.from_trigflow(t, SIGMA_D)
        out = teacher.call(teacher.backbone, (_bcast(c_in, x) * x).float(), tau.float(), fields)
        return schedule.trigflow_velocity(out, x, t, SIGMA_D)

    value, tangent = jvp(velocity, (x_s, s), (dx, torch.ones_like(s)))
    torch.testing.assert_close(value, velocity(x_s, s), rtol=1e-4, atol=1e-5)  # math vs default SDPA kernel
    h = 1e-4  # the velocity curves fast in s (1 / sin s, the piecewise-linear tau(s)): a small step in fp32
    numeric = (velocity(x_s + h * dx, s + h) - velocity(x_s - h * dx, s - h)) / (2 * h)
    rel = (tangent - numeric).flatten(1).norm(dim=1) / numeric.flatten(1).norm(dim=1)
    assert rel.max() < 1e-2, rel
    assert math.isfinite(float(tangent.abs().max()))
