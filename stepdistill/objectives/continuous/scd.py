"""sCD: continuous-time consistency distillation on TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", arXiv 2410.11081, Algorithm 1).

TrigFlow (§2): x_s = cos s x0 + sin s z, z ~ N(0, sigma_d^2 I), s in [0, pi/2]; the consistency function is
f(x_s, s) = cos s x_s - sin s sigma_d F(x_s, s) (Eq. 7). Teacher and student keep their own architecture and
parameterization: `NoiseSchedule.from_trigflow` / `trigflow_velocity` make any VP or flow backbone a TrigFlow model
exactly (FastGen's TrigFlowPrecond), so the student starts as the teacher and f is its x0 estimate at the matching
model timestep. A training step, per sample:
  log(sigma_d tan s) ~ N(P_mean, P_std^2)                                      (proposal, §4.3)
  dx_s/ds = sigma_d F_teacher(x_s, s), guided (CFG baked in)                  (sCD)
  cos s sin s dF-/ds = JVP of F- at (x_s, s) along cos s sin s (dx_s/ds, 1)    (Eq. 8, "JVP rearrangement")
  g = -cos^2 s (sigma_d F- - dx_s/ds) - r (cos s sin s x_s + sigma_d cos s sin s dF-/ds),  r = min(1, it / H)
  g <- g / (||g|| + c)                                                         (tangent normalization, §4.2)
  L = exp(w(s)) / D ||F_theta - F- - g||^2 - w(s)                              (adaptive weighting, §4.2)
F- is F_theta without gradient. The learned weighting w(s) has its own optimizer phase on the same error.
Sampling: the student is a re-noising generator at the teacher's timesteps (x0 = f, fresh noise to the next time
is cos s x0 + sin s sigma_d eps), so its export is the teacher's pipeline with LCMScheduler (VP) or a stochastic
FlowMatch scheduler (flow).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn

from stepdistill.config.schema import PairsConfig
from stepdistill.jvp import jvp
from stepdistill.mlp import timestep_embedding
from stepdistill.objectives.base import Objective, ObjectiveConfig, OptimizerGroup
from stepdistill.objectives.continuous.samples import CleanSamples
from stepdistill.schedules import _bcast
from stepdistill.teachers.base import Cond

Velocity = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SCDConfig(ObjectiveConfig):
    """Defaults: sCM paper (CIFAR-10 / ImageNet-64) and FastGen `configs/methods/config_scm.py` unless noted."""

    name: str = "scd"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # FastGen sCM (RAdam in FastGen)
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping (FastGen clips at 1e6)
    sigma_d: float = 0.5  # sigma_data of pixels in [-1, 1]
    p_mean: float = -1.0  # log(sigma_d tan s) ~ N(p_mean, p_std^2) (sCM Tables 3-4)
    p_std: float = 1.4
    tangent_warmup: int = 10000  # H: r = min(1, step / H) (sCM §4.1)
    tangent_norm_c: float = 0.1  # c in g / (||g|| + c) (sCM §4.2)
    adaptive_weight: bool = True  # the learned w(s) (sCM §4.2)
    weighting_lr: float = 0.0  # the weighting's own learning rate (0: objective.lr)
    prior_weight: bool = True  # the 1 / (sigma_d tan s) prior of FastGen and SANA-Sprint (not in Algorithm 1)
    guidance: float = 1.0  # the teacher's CFG scale (standard form) baked into dx_s/ds
    data: str = "real"  # real (the GMM's own samples) | teacher (cached teacher ODE samples: data-free)
    pairs: PairsConfig = field(default_factory=PairsConfig)  # data=teacher: the cached teacher samples

    CHOICES = {"data": ("real", "teacher")}
    RANGES = {"lr": ">0", "sigma_d": ">0", "p_std": ">0", "tangent_warmup": ">=0", "tangent_norm_c": ">=0",
              "weighting_lr": ">=0", "guidance": ">=0", "max_grad_norm": ">=0", "weight_decay": ">=0"}


class AdaptiveWeight(nn.Module):
    """w(s): a linear head on sinusoids of the teacher's timestep (FastGen's `logvar_linear` on the network's noise
    embedding; SANA-Sprint: xavier weights, zero bias), so exp(w) starts near 1."""

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(dim, 1)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tau: Tensor) -> Tensor:
        return self.linear(timestep_embedding(tau.float(), self.dim)).squeeze(-1)


class SCD(CleanSamples, Objective):
    """Continuous-time consistency distillation (sCD) of any VP or flow teacher through TrigFlow."""

    name = "scd"
    config_class = SCDConfig
    config: SCDConfig

    def __init__(self, teacher, generator, source, config: SCDConfig, data=None) -> None:
        super().__init__(teacher, generator, source, config, data)
        self.weighting = AdaptiveWeight() if config.adaptive_weight else None
        # (tau, prior weight x error) of the generator phase: what w(s)'s phase fits
        self._last: tuple[Tensor, Tensor] | None = None

    @cached_property
    def time_range(self) -> tuple[float, float]:
        """The TrigFlow times of the teacher's timestep range (computed on first use: the planner builds the
        objective on the meta device, where the schedule's tables hold no numbers)."""
        schedule = self.teacher.schedule
        lo, hi = schedule.timestep_range()
        # a flow's timestep 0 is clean data, where F = (cos s x - x0) / sin s is 0 / 0: its lowest time is 1
        ends = torch.tensor([lo if schedule.kind == "vp" else 1.0, hi], dtype=torch.float64)
        s = schedule.trigflow_time(ends, self.config.sigma_d)
        return float(s[0]), float(s[1])

    @property
    def reference_guidance(self) -> float:
        return self.config.guidance

    def optimizer_groups(self) -> list[OptimizerGroup]:
        c = self.config
        betas = (c.betas[0], c.betas[1])
        groups = [OptimizerGroup("generator", "generator.backbone", c.lr, betas, c.weight_decay,
                                 max_grad_norm=c.max_grad_norm or None)]
        if self.weighting is not None:
            groups.append(OptimizerGroup("weighting", "weighting", c.weighting_lr or c.lr, betas, 0.0,
                                         max_grad_norm=None))
        return groups

    def trace_phase(self, phase: str, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The weighting phase runs w(s) alone (the generator phase: the student's forward, as by default)."""
        return self.weighting(t) if phase == "weighting" else super().trace_phase(phase, x, t, cond)

    # ------------------------------------------------------------------ pieces of Algorithm 1
    def sample_times(self, n: int) -> Tensor:
        """s = arctan(exp(tau) / sigma_d), tau ~ N(P_mean, P_std^2), within the teacher's times (float64)."""
        c = self.config
        log_sigma = c.p_mean + c.p_std * torch.randn(n, dtype=torch.float64)
        return torch.atan(log_sigma.exp() / c.sigma_d).clamp(*self.time_range).to(self.device)

    def velocity(self, call: Callable[[Tensor, Tensor], Tensor], prediction_type: str | None) -> Velocity:
        """(x_s, s) -> sigma_d F(x_s, s) of a backbone call (x_model, tau) -> raw output, through the schedule's
        exact conversion; differentiable in x_s and s."""
        schedule, sigma_d = self.teacher.schedule, self.config.sigma_d

        def velocity(x_s: Tensor, s: Tensor) -> Tensor:
            tau, c_in = schedule.from_trigflow(s, sigma_d)
            out = call((_bcast(c_in, x_s) * x_s).float(), tau.float())
            return schedule.trigflow_velocity(out, x_s, s, sigma_d, prediction_type)

        return velocity

    def student_velocity(self, fields: dict[str, Tensor]) -> Velocity:
        generator = self.generator
        return self.velocity(lambda x, tau: self.teacher.call(generator.backbone, x, tau, fields),
                             generator.prediction_type)

    @torch.no_grad()
    def teacher_velocity(self, x_s: Tensor, s: Tensor, cond: Cond) -> Tensor:
        """dx_s/ds of the teacher's guided PF-ODE (CFG on the raw outputs: the conversion is affine in them)."""
        guidance = self.config.guidance if cond.fields else 1.0
        return self.velocity(lambda x, tau: self.teacher.guided_output(x, tau, cond, guidance), None)(x_s, s)

    def tangent(self, x_s: Tensor, s: Tensor, v_student: Tensor, dv_student: Tensor, dxds: Tensor,
                step: int) -> Tensor:
        """g = -cos^2 s (sigma_d F- - dx/ds) - r (cos s sin s x_s + sigma_d cos s sin s dF-/ds) (Algorithm 1);
        `dv_student` is the JVP output cos s sin s sigma_d dF-/ds."""
        r = min(1.0, step / self.config.tangent_warmup) if self.config.tangent_warmup else 1.0
        cos, sin = _bcast(s.cos(), x_s), _bcast(s.sin(), x_s)
        return -cos * cos * (v_student - dxds) - r * (cos * sin * x_s.double() + dv_student)

    def normalize(self, g: Tensor) -> Tensor:
        """g / (||g|| + c) per sample (sCM §4.2: bounds the target's scale where dF/ds is large, near s = pi/2)."""
        norm = torch.linalg.vector_norm(g, dim=tuple(range(1, g.ndim)), keepdim=True)
        return g / (norm + self.config.tangent_norm_c)

    # ------------------------------------------------------------------ training step
    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        if phase == "weighting":
            return self.weighting_loss()
        c = self.config
        cond = self.source.encode(batch["cond_index"]).to(self.device)
        x0 = self.clean_samples(batch, len(cond)).double()
        s = self.sample_times(len(cond))
        z = c.sigma_d * torch.randn_like(x0)
        x_s = (_bcast(s.cos(), x0) * x0 + _bcast(s.sin(), x0) * z).float()
        dxds = self.teacher_velocity(x_s, s, cond)
        F = self.student_velocity(cond.fields)
        cs = s.cos() * s.sin()
        with torch.no_grad():  # F- and cos s sin s sigma_d dF-/ds in one forward-mode pass (sCM Eq. 8)
            v_minus, dv = jvp(F, (x_s, s), ((_bcast(cs, dxds) * dxds).float(), cs))
        g = self.normalize(self.tangent(x_s, s, v_minus, dv, dxds, step))
        F_theta, F_minus = F(x_s, s) / c.sigma_d, v_minus / c.sigma_d
        dims = tuple(range(1, x_s.ndim))
        error = (F_theta - F_minus - g).square().mean(dims)  # ||.||^2 / D
        tau = self.teacher.schedule.from_trigflow(s, c.sigma_d)[0]
        weight = 1.0 / (c.sigma_d * s.tan()) if c.prior_weight else torch.ones_like(s)
        if self.weighting is not None:
            self._last = (tau.detach(), (weight * error).detach())
            weight = weight * self.weighting(tau).detach().double().exp()
        return {"loss": (weight * error).mean().float(), "tangent_norm": g.flatten(1).norm(dim=1).mean().float(),
                "warmup": torch.tensor(min(1.0, step / c.tangent_warmup) if c.tangent_warmup else 1.0)}

    def weighting_loss(self) -> dict[str, Tensor]:
        """exp(w) / D ||F_theta - F- - g||^2 - w on the generator phase's samples (its prior weight included): the
        gradient in w of the joint loss, since the error does not depend on w."""
        if self._last is None:
            raise RuntimeError("the weighting phase runs after the generator phase of the same step")
        tau, error = self._last
        w = self.weighting(tau).double()
        loss = (error * w.exp() - w).mean()
        return {"loss": loss.float(), "w_mean": w.mean().detach().float()}
