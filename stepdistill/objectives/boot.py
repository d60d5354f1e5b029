"""BOOT: data-free distillation on the signal ODE (Gu et al., "BOOT: Data-free Distillation of Denoising Diffusion
Models with Bootstrapping", arXiv 2306.05544; ICML 2024). There is no official code: the loss is derived from the
paper (docs/BOOT.md) and agrees with the `boot` branch of OFTSR's port (yuanzhi-zhu/OFTSR, `train_fm.py`).

Signal ODE (§3.1). The student g(eps, t) reads a fixed noise eps and returns y_t = (x_t - sigma_t eps) / alpha_t of
the teacher's DDIM trajectory from x_T ~ eps. With lambda_t = -log(alpha_t / sigma_t), one DDIM step t -> s of the
teacher's signal prediction f is, exactly (eps cancels):
    y_s = y_t + delta_t (f(x_t, t) - y_t),   delta_t = 1 - exp(lambda_s - lambda_t)
(the exponential integrator of dy/dt = -lambda'_t (f - y)). s = 0 is the clean end: lambda = -inf, delta = 1,
DDIM's last step y_0 = f; so g(eps, 0) is the one-step sample.
Training step, per sample (§3.2, §3.3): eps ~ N(0, I), t ~ U[t_min, t_max], s = max(t - Delta, 0),
    y_t = SG g(eps, t);  x_t = alpha_t y_t + sigma_t eps;  f = the teacher's x0 at (x_t, t), CFG w (§3.4)
    L_BS = ||g(eps, s) - SG[y_t + delta_t (f - y_t)]||^2 / delta_t^2          (bootstrapping)
    L_BC = ||g(eps, T) - f(eps, T)||^2,  T = t_max                               (boundary at the noise end)
    L = L_BS + boundary_weight L_BC
The teacher runs once per step on [x_t; eps] at [t; T], its conditional and null branches batched (2 evaluations
per sample and term).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stepdistill.config.schema import ConfigError
from stepdistill.objectives.base import Objective, ObjectiveConfig, OptimizerGroup
from stepdistill.schedules import _bcast
from stepdistill.students import Generator, student_schedule
from stepdistill.students.signal import SignalGenerator
from stepdistill.teachers.base import Cond, Teacher


@dataclass
class BootConfig(ObjectiveConfig):
    """BOOT publishes no code or training hyperparameters for latent teachers: the defaults are OFTSR's where it
    has one (lr 1e-4, clip 1) and measured on the analytic and digits teachers otherwise (docs/BOOT.md)."""

    name: str = "boot"
    lr: float = 1e-4  # OFTSR's Adam lr (configs/dis_fm_*.yml)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # OFTSR
    guidance: float = 1.0  # teacher CFG scale baked into the student, standard form (1 = off)
    step_size: float = 20.0  # Delta = t - s in model timesteps; BOOT: "a fixed step", value not given
    t_min: float = 0.0  # t ~ U[t_min, t_max] in model timesteps: the whole trajectory (BOOT samples t uniformly)
    t_max: float = 999.0  # the noise end T, where the boundary loss anchors the trajectory
    boundary_weight: float = 1.0  # BOOT §3.3 adds L_BC to L_BS with weight 1

    RANGES = {"lr": ">0", "weight_decay": ">=0", "max_grad_norm": ">0", "guidance": ">=0", "step_size": ">0",
              "t_min": ">=0", "t_max": ">0", "boundary_weight": ">=0"}


class Boot(Objective):
    """The signal-ODE student trained by bootstrapping between two consecutive times plus the noise-end boundary."""

    name = "boot"
    config_class = BootConfig
    config: BootConfig

    @classmethod
    def build_generator(cls, teacher: Teacher, backbone: nn.Module, student_cfg, config: BootConfig) -> Generator:
        return SignalGenerator(backbone, teacher, [0.0], student_schedule(teacher, student_cfg),
                               student_cfg.prediction_type)

    @classmethod
    def preflight(cls, cfg) -> None:
        c = cfg.objective
        if list(cfg.student.timesteps) != [0]:
            raise ConfigError(f"student.timesteps: BOOT's student samples in one step at t = 0 (the signal ODE's "
                              f"clean end), got {cfg.student.timesteps}: set student.timesteps=[0]")
        if cfg.student.schedule != "teacher":
            raise ConfigError("student.schedule: BOOT's student lives on the teacher's own trajectory: set "
                              "student.schedule=teacher")
        if c.t_min >= c.t_max:
            raise ConfigError(f"objective.t_min ({c.t_min}) must be below objective.t_max ({c.t_max})")

    def check_compatible(self) -> None:
        schedule = self.teacher.schedule
        if schedule.kind != "vp":
            raise ValueError("objective.name=boot needs a VP teacher (SD1.x/2.x, SDXL, PixArt, teacher.schedule=vp): "
                             "a flow schedule's Euler export cannot return the signal at its clean end")
        if self.config.t_max > schedule.num_train_timesteps - 1:
            raise ValueError(f"objective.t_max must not exceed the teacher's top timestep "
                             f"{schedule.num_train_timesteps - 1}, got {self.config.t_max}")

    def optimizer_groups(self) -> list[OptimizerGroup]:
        c = self.config
        return [OptimizerGroup("generator", "generator.backbone", c.lr, weight_decay=c.weight_decay,
                               max_grad_norm=c.max_grad_norm)]

    # ------------------------------------------------------------------ pieces of the algorithm
    def times(self, n: int) -> tuple[Tensor, Tensor]:
        """t ~ U[t_min, t_max] and s = max(t - Delta, 0), per sample."""
        c = self.config
        t = c.t_min + (c.t_max - c.t_min) * torch.rand(n, device=self.device)
        return t, (t - c.step_size).clamp(min=0.0)

    def delta(self, t: Tensor, s: Tensor) -> Tensor:
        """delta_t = 1 - exp(lambda_s - lambda_t), lambda = -log(alpha / sigma); 1 at the clean end s = 0."""
        lam = lambda u: -self.teacher.schedule.half_log_snr(u)  # noqa: E731 - BOOT's lambda, float64
        d = -torch.expm1(lam(s) - lam(t))
        return torch.where(s <= 0, torch.ones_like(d), d).to(torch.float32)

    @torch.no_grad()
    def teacher_signal(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The frozen teacher's guided signal (x0) prediction f(x, t | c)."""
        guidance = self.config.guidance if cond.fields else 1.0
        return self.teacher.predict(x, t, cond, guidance).x0

    @torch.no_grad()
    def start_signal(self, eps: Tensor, cond: Cond, t: Tensor) -> Tensor:
        """y_t = SG g(eps, t): the bootstrap's starting point, without gradient."""
        return self.generator(eps, cond, t)

    def signal_step(self, y_t: Tensor, f: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """One DDIM step of the signal ODE: y_s = y_t + delta_t (f - y_t)."""
        return y_t + _bcast(self.delta(t, s), y_t) * (f - y_t)

    # ------------------------------------------------------------------ training step
    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        c = self.config
        cond = self.source.encode(batch["cond_index"]).to(self.device)
        eps = self.noise(len(cond))
        t, s = self.times(len(cond))
        top = torch.full_like(t, c.t_max)
        both = Cond.cat([cond, cond])
        y_t = self.start_signal(eps, cond, t)
        x_t = self.generator.state(y_t, eps, t)
        f_t, f_top = self.teacher_signal(torch.cat([x_t, eps]), torch.cat([t, top]), both).chunk(2)
        target = self.signal_step(y_t, f_t, t, s)
        y_s, y_top = self.generator(torch.cat([eps, eps]), both, torch.cat([s, top])).chunk(2)
        bootstrap = (_bcast(self.delta(t, s), y_s) ** -2 * (y_s - target) ** 2).mean()
        boundary = ((y_top - f_top) ** 2).mean()
        return {"loss": bootstrap + c.boundary_weight * boundary, "bootstrap": bootstrap.detach(),
                "boundary": boundary.detach()}
