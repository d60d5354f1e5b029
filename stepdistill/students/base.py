"""The generator protocol: G(z, cond, t) -> x0 over a backbone. A generator owns its noise schedule, its
parameterization and its sampling recipe, so objectives, export and evaluation never guess how it is sampled."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from stepdistill.schedules import NoiseSchedule, PredictionType
from stepdistill.teachers.base import Cond, Teacher


@dataclass
class SamplingRecipe:
    """How a student is sampled, in the terms an exporter needs to choose a diffusers scheduler."""

    timesteps: list[float]  # conditioning time of each step on the student's own time axis, descending
    sampler: str  # "renoise": x0, then fresh noise to the next time | "ode": deterministic DDIM/Euler jumps
    prediction_type: str
    schedule: NoiseSchedule
    guidance_scale: float = 0.0  # the pipeline's guidance_scale argument (0: no classifier-free guidance)
    any_num_steps: bool = False  # a multistep model: sampled at any number of steps of its schedule's grid
    # generator-specific facts recorded in the export; "note": a paragraph for the model card
    extra: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def as_dict(self) -> dict:
        return {"timesteps": self.timesteps, "sampler": self.sampler, "prediction_type": self.prediction_type,
                "schedule": self.schedule.kind, "flow_shift": self.schedule.shift,
                "guidance_scale": self.guidance_scale, "any_num_steps": self.any_num_steps, **self.extra}


def recipe_schedule(teacher: Teacher, recipe: dict) -> NoiseSchedule:
    """The schedule a recorded recipe names: the teacher's own, or a flow with the recorded shift."""
    if recipe["schedule"] == teacher.schedule.kind and recipe["flow_shift"] == teacher.schedule.shift:
        return teacher.schedule
    if recipe["schedule"] != "flow":
        raise ValueError(f"the export's {recipe['schedule']} schedule is not the teacher's ({teacher.schedule.kind})")
    return NoiseSchedule.flow(recipe["flow_shift"], teacher.schedule.num_train_timesteps)


def check_timesteps(timesteps: list[float]) -> list[float]:
    if not timesteps or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"student timesteps must be a non-empty strictly decreasing list, got {timesteps}")
    return [float(t) for t in timesteps]


GENERATOR_CLASSES: dict[str, type[Generator]] = {}


def generator_class(name: str) -> type[Generator]:
    """The generator class an export recorded (every subclass registers itself by name)."""
    if name not in GENERATOR_CLASSES:
        raise ValueError(f"unknown generator class {name!r} (known: {sorted(GENERATOR_CLASSES)}): import the module "
                         "of the objective that defines it")
    return GENERATOR_CLASSES[name]


class Generator(nn.Module):
    """A student backbone of the teacher's architecture with its own schedule and parameterization.

    `forward(z, cond, t)` is the clean-sample estimate for the step input z at per-sample time t; `advance` turns
    the input of step i into the input of step i + 1 (the sampler), `sample` chains them from pure noise."""

    sampler: ClassVar[str]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        GENERATOR_CLASSES[cls.__name__] = cls

    def __init__(self, backbone: nn.Module, teacher: Teacher, timesteps: list[float],
                 schedule: NoiseSchedule | None = None, prediction_type: PredictionType | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self._teacher = [teacher]  # a plain list keeps the (frozen, non-Module) teacher out of state_dict
        self.timesteps = check_timesteps(timesteps)
        self.schedule = schedule or teacher.schedule
        self.prediction_type = prediction_type or self.schedule.prediction_type

    @property
    def teacher(self) -> Teacher:
        """The teacher whose architecture the backbone shares: it knows how to call the backbone."""
        return self._teacher[0]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def time(self, step: int, like: Tensor) -> Tensor:
        """The time of sampling step `step` for every sample of `like`."""
        return torch.full((like.shape[0],), self.timesteps[step], device=like.device)

    def fields(self, cond: Cond, z: Tensor) -> dict[str, Tensor]:
        """Backbone conditioning for a batch; generators with extra inputs (LCM's w embedding) add them."""
        return cond.fields

    def output(self, z: Tensor, cond: Cond, t: Tensor) -> Tensor:
        """Raw backbone output (the generator's parameterization) for input z at time t."""
        return self.teacher.call(self.backbone, z, t, self.fields(cond, z))

    def forward(self, z: Tensor, cond: Cond, t: Tensor) -> Tensor:
        """The clean sample x0 (fp32) that the generator maps input z at time t to."""
        return self.schedule.to_x0_eps(self.output(z, cond, t), z, t, self.prediction_type)[0]

    def advance(self, z: Tensor, cond: Cond, step: int) -> Tensor:
        """The input of sampling step `step` + 1, from the input z of step `step`."""
        raise NotImplementedError

    @torch.no_grad()
    def simulate(self, noise: Tensor, cond: Cond, step: int) -> Tensor:
        """The input that the sampler feeds to `step`, produced by the generator's own earlier steps without
        gradient (DMD2 §4.4's backward simulation)."""
        x = noise
        for i in range(step):
            x = self.advance(x, cond, i)
        return x

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Cond, num_steps: int | None = None) -> Tensor:
        """Sampling from pure noise with the first `num_steps` steps (default: all)."""
        n = num_steps or self.num_steps
        x = self.simulate(noise, cond, n - 1)
        return self(x, cond, self.time(n - 1, x))

    def recipe(self) -> SamplingRecipe:
        guidance = self.teacher.embedded_guidance  # a guidance-distilled backbone is sampled at its embedded value
        return SamplingRecipe(list(self.timesteps), self.sampler, self.prediction_type, self.schedule,
                              guidance_scale=0.0 if guidance is None else guidance,
                              extra={"generator": type(self).__name__})

    @classmethod
    def from_recipe(cls, backbone: nn.Module, teacher: Teacher, recipe: dict) -> Generator:
        """Rebuild an exported generator from its recorded recipe (`SamplingRecipe.as_dict`)."""
        return cls(backbone, teacher, recipe["timesteps"], recipe_schedule(teacher, recipe), recipe["prediction_type"])


class RenoiseGenerator(Generator):
    """k-step student: x0 = G(x_{t_i}), re-noised with fresh noise to t_{i+1} (LCMScheduler's rule). t_0 may be
    below T: pure noise is then read as if it were x_{t_0} (DMD2's SDXL one-step trick with t_0 = 399)."""

    sampler = "renoise"

    def advance(self, z: Tensor, cond: Cond, step: int) -> Tensor:
        x0 = self(z, cond, self.time(step, z))
        return self.schedule.add_noise(x0, torch.randn_like(x0), self.time(step + 1, z))


class OdeGenerator(Generator):
    """Deterministic DDIM (Euler for flow) jumps between the timesteps, the last step to x0: a multistep
    consistency student (MCD sampling) or a flow."""

    sampler = "ode"

    def advance(self, z: Tensor, cond: Cond, step: int) -> Tensor:
        t = self.time(step, z)
        x0, eps = self.schedule.to_x0_eps(self.output(z, cond, t), z, t, self.prediction_type)
        return self.schedule.ddim_step(x0, eps, self.time(step + 1, z)).to(z.dtype)
