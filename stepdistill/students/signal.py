"""BOOT's signal-ODE student (Gu et al. 2023, arXiv 2306.05544, §3.1): g(eps, t | c) reads the same pure noise eps
at every time t and returns the signal y_t = (x_t - sigma_t eps) / alpha_t of the teacher's deterministic (DDIM)
trajectory that starts from eps, whose state is x_t = alpha_t y_t + sigma_t eps. Time 0 is the trajectory's clean
end, so the student samples in one step: g(eps, 0)."""
from __future__ import annotations

from torch import Tensor

from stepdistill.students.base import Generator, SamplingRecipe
from stepdistill.teachers.base import Cond


class SignalGenerator(Generator):
    """The signal-ODE student over a backbone of the teacher's architecture, which reads eps in place of x_t.

    `forward(eps, cond, t)` is y_t in the generator's parameterization with eps as the backbone input: `sample`
    (the backbone outputs y_t itself), or the teacher's `epsilon` / `v_prediction` read as if eps were x_t (then an
    untrained copy of the teacher gives g(eps, t) = f(eps, t), the teacher's own signal estimate from pure noise).
    Its one sampling step, at t = 0, is what a diffusers Euler step at timestep 0 computes from pure noise with the
    same prediction type, so the export is a plain pipeline folder (export/schedulers.py, "ode")."""

    sampler = "ode"

    def advance(self, z: Tensor, cond: Cond, step: int) -> Tensor:
        """Every time reads the same noise: the input of the next step is the input of this one."""
        return z

    def state(self, y: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The trajectory's state x_t = alpha_t y_t + sigma_t eps for its signal y_t."""
        return self.schedule.add_noise(y, eps, t)

    def trajectory(self, eps: Tensor, cond: Cond, t: Tensor) -> Tensor:
        """The student's estimate of the teacher's DDIM state x_t from eps, at any per-sample time t > 0."""
        return self.state(self(eps, cond, t), eps, t)

    def recipe(self) -> SamplingRecipe:
        recipe = super().recipe()
        recipe.extra["note"] = (
            "A BOOT signal-ODE student: the backbone reads pure noise at every timestep and predicts the signal "
            "y_t = (x_t - sigma_t eps) / alpha_t of the teacher's DDIM trajectory from that noise; one step at "
            "timestep 0 is its sample. It is not a denoiser: do not sample it with other schedulers or timesteps.")
        return recipe
