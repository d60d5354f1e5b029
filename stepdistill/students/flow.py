"""A multistep rectified flow (Liu et al. 2023): a velocity model sampled with N Euler steps of its own flow
schedule's grid, for any N. The k-rectified flow of reflow rounds, exported as a multistep pipeline and loadable
as the next round's teacher.

Conventions (the package's flow schedule, SD3 / diffusers FlowMatch): x_s = (1 - s) x0 + s eps with s = t / T,
t = T at pure noise, the network predicts u = eps - x0 at time t = T s. InstaFlow's checkpoints predict the
opposite sign (x0 - eps) on the same time axis (1000 (1 - tau) = T s); Liu et al.'s CIFAR code uses t = 0 at
noise: a port from either must flip the sign or the time.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from stepdistill.schedules import NoiseSchedule
from stepdistill.students.base import OdeGenerator, SamplingRecipe, recipe_schedule
from stepdistill.teachers.base import Cond, Teacher


class FlowGenerator(OdeGenerator):
    """A velocity model on a flow schedule, sampled with `num_steps` Euler steps by default and any number on
    request (`sample(..., num_steps=N)`, `trajectory`); `guidance` > 1 samples with classifier-free guidance on
    the velocity (InstaFlow's 2-RF: 1 to 2). Training calls `velocity`, which never applies guidance."""

    def __init__(self, backbone: nn.Module, teacher: Teacher, num_steps: int, schedule: NoiseSchedule,
                 guidance: float = 1.0) -> None:
        if schedule.kind != "flow":
            raise ValueError(f"a FlowGenerator needs a flow schedule, got {schedule.kind}: set student.schedule=flow")
        super().__init__(backbone, teacher, schedule.inference_timesteps(num_steps), schedule, "flow")
        self.guidance = guidance

    def velocity(self, x: Tensor, cond: Cond, t: Tensor) -> Tensor:
        """u(x, t) = eps - x0 for the prompts' own conditioning, no guidance (fp32)."""
        return self.teacher.call(self.backbone, x, t, self.fields(cond, x))

    def output(self, z: Tensor, cond: Cond, t: Tensor) -> Tensor:
        """The sampling velocity: with classifier-free guidance when `guidance` > 1 (diffusers' rule)."""
        if self.guidance > 1.0:
            return self.teacher.guided_output(z, t, cond, self.guidance, net=self.backbone)
        return self.velocity(z, cond, t)

    @torch.no_grad()
    def trajectory(self, noise: Tensor, cond: Cond, num_steps: int | None = None) -> Iterator[tuple[Tensor, float]]:
        """(state, flow time s) along the N-step Euler path from pure noise: s = 1, ..., then the sample at s = 0."""
        timesteps = self.schedule.inference_timesteps(num_steps or self.num_steps)
        T = self.schedule.num_train_timesteps
        x = noise.to(torch.float32)
        for i, t in enumerate(timesteps):
            yield x, t / T
            t_vec = torch.full((x.shape[0],), t, device=x.device)
            t_next = torch.full_like(t_vec, timesteps[i + 1]) if i + 1 < len(timesteps) else None
            x = self.schedule.step(self.output(x, cond, t_vec), x, t_vec, t_next, "flow")
        yield x, 0.0

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Cond, num_steps: int | None = None) -> Tensor:
        """N Euler steps from pure noise on the schedule's N-step grid (default N: `num_steps` of the recipe)."""
        for x, _ in self.trajectory(noise, cond, num_steps):
            pass
        return x

    def recipe(self) -> SamplingRecipe:
        recipe = super().recipe()
        recipe.any_num_steps = True
        recipe.guidance_scale = self.guidance if self.guidance > 1.0 else 0.0
        return recipe

    @classmethod
    def from_recipe(cls, backbone: nn.Module, teacher: Teacher, recipe: dict) -> FlowGenerator:
        return cls(backbone, teacher, len(recipe["timesteps"]), recipe_schedule(teacher, recipe),
                   max(1.0, recipe["guidance_scale"]))
