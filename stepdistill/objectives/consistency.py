"""Consistency distillation: LCM / LCM-LoRA, multistep segments (MCD, MLCM, PCM) and Hyper-SD's TSCD stages.

One core parameterised by the number of segments S (S = 1 is LCM). The teacher's skipping-step DDIM grid
t_i = (i + 1) k - 1 (i = 0..N-1, k = T / N) is cut into S segments at the grid indices e_j = floor(j N / S)
(PCM's phase edges). The student F_theta maps a grid point t of a segment to that segment's boundary b(t):
  lowest segment: clean data, F = c_skip(t) x_t + c_out(t) x0_theta                 (LCM Eq. 9, discrete form)
  other segments: the grid point below the edge, F = alpha_b x0_theta + sigma_b eps_theta   (MCD §3, DDIM)
Training step, per sample (LCM Algorithm 1 as restated in the LCM-LoRA report, generalised to segments):
  i ~ U{0..N-1}, t = t_i, s = max(t - k, 0), x_t = alpha_t x0 + sigma_t eps, omega ~ U[omega_min, omega_max]
  x_s = DDIM_{t->s}(teacher with CFG (1 + omega) cond - omega uncond)                  (LCM Eq. 8, Psi = DDIM)
  target = x_s if s is an upper segment's boundary else F_{theta^-}(x_s, s)            (stop-gradient)
  L = d(F_theta(x_t, t), target);  theta^- <- mu theta^- + (1 - mu) theta                (EMA target, LCM Alg. 1)
omega is the LCM paper's guidance (g = omega + 1 in the diffusers pipelines, `Teacher.predict` form).
Progressive segment schedules (MLCM, Hyper-SD 8 -> 4 -> 2 -> 1) are `stages`, run by `stepdistill.stages`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from stepdistill.data import PairDataset, generate_pairs
from stepdistill.objectives.base import Objective, ObjectiveConfig, OptimizerGroup, reconstruction_loss
from stepdistill.schedules import NoiseSchedule, _bcast
from stepdistill.students import (
    BaseNetwork,
    Generator,
    SegmentGenerator,
    adapter_layers,
    frozen_copy,
    guidance_embedding,
    public_config,
)
from stepdistill.teachers.base import Cond, Teacher


@dataclass
class ConsistencyConfig(ObjectiveConfig):
    """Defaults: diffusers `train_lcm_distill_sd_wds.py` (the LCM authors' recipe) unless noted."""

    name: str = "consistency"
    lr: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_ddim_timesteps: int = 50  # N; skipping step k = 1000 / 50 = 20 (LCM §4.3 ablation)
    num_segments: int = 1  # S: 1 = LCM; 4 = PCM/MCD default; Hyper-SD trains 8 -> 4 -> 2 -> 1
    w_min: float = 5.0  # omega range, LCM form: teacher CFG (1 + omega) cond - omega uncond
    w_max: float = 15.0
    guidance_embedding_dim: int = 0  # LCM's w-embedding (timestep_cond) size: 256 for full UNets, 0 = off
    timestep_scaling: float = 10.0  # c_skip / c_out of LCMScheduler (sigma_data 0.5)
    sigma_data: float = 0.5
    target: str = "ema"  # ema (LCM) | online (stop-gradient copy of the online net: LCM-LoRA, PCM)
    ema_decay: float = 0.95  # LCM's fast Polyak target
    teacher_net: str = "teacher"  # teacher | lora_base (the LoRA student's base with adapters disabled)
    loss: str = "pseudo_huber"  # pseudo_huber (c = 0.001) | l2
    huber_c: float = 0.001
    # real (the GMM's own samples) | teacher (cached teacher ODE samples, re-noised; data-free) | trajectory
    # (states on cached teacher trajectories over the solver grid, MLCM §3: no forward noising at all)
    data: str = "real"
    num_pairs: int = 10000  # data=teacher: number of cached teacher samples
    pair_steps: int = 50  # data=teacher: DDIM steps of the teacher sampler
    pair_guidance: float = 1.0  # data=teacher: CFG scale (standard form) of the cached samples
    pair_dir: str = ""
    pair_seed: int = 0
    stages: list[dict] = field(default_factory=list)  # [{num_segments: 8, max_steps: N, ...}, ...] (stages.py)

    CHOICES = {"target": ("ema", "online"), "teacher_net": ("teacher", "lora_base"),
               "loss": ("l2", "pseudo_huber"), "data": ("real", "teacher", "trajectory")}


# ---------------------------------------------------------------------------------------------- geometry
def segment_edges(num_grid: int, num_segments: int) -> list[int]:
    """Grid index of each segment's lower edge: floor(j N / S), j = 0..S-1 (PCM's phase edges)."""
    if not 1 <= num_segments <= num_grid:
        raise ValueError(f"num_segments must lie in [1, {num_grid}] (the DDIM grid size), got {num_segments}")
    return [j * num_grid // num_segments for j in range(num_segments)]


def segment_boundaries(grid: Tensor, num_segments: int) -> Tensor:
    """For every grid index, the timestep its segment maps to: -1 (clean data) for the lowest segment, else the
    grid point just below the segment's lower edge."""
    edges = segment_edges(len(grid), num_segments)
    out = torch.full((len(grid),), -1, dtype=torch.int64)
    for e in edges[1:]:
        out[e:] = grid[e - 1]
    return out


def segment_timesteps(grid: Tensor, num_segments: int) -> list[int]:
    """The S sampling timesteps of a segmented student: the top of every segment, descending from t_{N-1}."""
    edges = segment_edges(len(grid), num_segments)
    return [int(grid[-1])] + [int(grid[e - 1]) for e in reversed(edges[1:])]


def lcm_timesteps(grid: Tensor, num_steps: int) -> list[int]:
    """LCMScheduler.set_timesteps on the same grid: the reversed grid at indices floor(j N / n)."""
    rev = grid.flip(0)
    return [int(rev[j * len(grid) // num_steps]) for j in range(num_steps)]


# ---------------------------------------------------------------------------------------------- networks
def unwrap(net: nn.Module) -> nn.Module:
    return getattr(net, "module", net)


def with_guidance_embedding(backbone: nn.Module, dim: int) -> nn.Module:
    """A diffusers UNet with `time_cond_proj_dim = dim`; a new `cond_proj` is randomly initialised and every
    other weight copied (diffusers LCM script: `from_config(..., time_cond_proj_dim=256)`, strict=False)."""
    config = getattr(backbone, "config", None)
    if config is None or "time_cond_proj_dim" not in config:
        raise ValueError(f"objective.guidance_embedding_dim needs a UNet2DConditionModel student, got "
                         f"{type(backbone).__name__}; set it to 0")
    if config.time_cond_proj_dim == dim:
        return backbone
    new = type(backbone).from_config({**public_config(backbone), "time_cond_proj_dim": dim})
    missing, unexpected = new.load_state_dict(backbone.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise ValueError(f"cannot add a guidance embedding: missing {missing}, unexpected {unexpected}")
    return new.to(next(backbone.parameters()).device)


# ---------------------------------------------------------------------------------------------- objective
class Consistency(Objective):
    """LCM (S = 1) and multistep consistency distillation (S > 1) with an EMA or online target."""

    name = "consistency"
    config_class = ConsistencyConfig
    config: ConsistencyConfig

    def __init__(self, teacher: Teacher, generator: Generator, source, config: ConsistencyConfig) -> None:
        if config.stages:
            raise ValueError("objective.stages is set: run the stages with `stepdistill train --config FILE` "
                             "(each stage trains with its own num_segments)")
        if config.w_min > config.w_max:
            raise ValueError(f"objective.w_min ({config.w_min}) must not exceed objective.w_max ({config.w_max})")
        if config.data == "trajectory" and not config.w_min == config.w_max == config.pair_guidance - 1:
            raise ValueError("objective.data=trajectory caches the teacher's trajectories at one guidance scale: set "
                             "objective.w_min = objective.w_max = objective.pair_guidance - 1")
        if config.target == "ema" and not 0.0 <= config.ema_decay < 1.0:
            raise ValueError(f"objective.ema_decay must lie in [0, 1), got {config.ema_decay}")
        super().__init__(teacher, generator, source, config)
        schedule: NoiseSchedule = teacher.schedule
        self.grid = schedule.skipping_step_grid(config.num_ddim_timesteps)
        self.skip = schedule.num_train_timesteps // config.num_ddim_timesteps
        self.boundaries = segment_boundaries(self.grid, config.num_segments)
        guidance_w = None
        if config.guidance_embedding_dim:
            generator.backbone = with_guidance_embedding(generator.backbone, config.guidance_embedding_dim)
            guidance_w = (config.w_min + config.w_max) / 2  # sampling w: the middle of the trained range
        cls = SegmentGenerator if config.num_segments > 1 else Generator
        timesteps = segment_timesteps(self.grid, config.num_segments) if config.num_segments > 1 else \
            generator.timesteps
        self.generator = cls(generator.backbone, teacher, timesteps, generator.prediction_type, guidance_w)
        self._base: list[nn.Module] = []  # teacher_net=lora_base: the student's base (a plain list: no submodule)
        if config.teacher_net == "lora_base":
            if not adapter_layers(self.generator.backbone):
                raise ValueError("objective.teacher_net=lora_base needs a LoRA student (student.kind: lora)")
            self._base.append(BaseNetwork(self.generator.backbone))
            if hasattr(teacher, "share_backbone"):  # one backbone in memory: the teacher's own copy is dropped
                teacher.share_backbone(self._base[0])
        # the EMA target starts from the online weights (a stage load resets it); checkpointed by the trainer
        self.target_backbone = frozen_copy(unwrap(self.generator.backbone)) if config.target == "ema" else None

    def optimizer_groups(self) -> list[OptimizerGroup]:
        c = self.config
        return [OptimizerGroup("generator", "generator.backbone", c.lr, weight_decay=c.weight_decay,
                               max_grad_norm=c.max_grad_norm)]

    # ------------------------------------------------------------------ data
    def prepare_data(self, output_dir: str | Path, device: str = "cpu") -> None:
        c = self.config
        if c.data == "real":
            if not hasattr(self.teacher, "mixture"):
                raise ValueError("objective.data=real needs a teacher with its own data (the GMM teacher); use "
                                 "objective.data=teacher for data-free distillation on teacher samples")
            return
        states = self.grid.flip(0).tolist() if c.data == "trajectory" else None
        self._pair_dir = generate_pairs(self.teacher, self.source, c.pair_dir or Path(output_dir) / "pairs",
                                        c.num_pairs, c.pair_steps, c.pair_guidance, c.pair_seed, device=device,
                                        state_timesteps=states)

    def dataset(self) -> Dataset:
        return super().dataset() if self.config.data == "real" else PairDataset(self._pair_dir)

    def clean_samples(self, batch: dict[str, Tensor], cond: Cond) -> Tensor:
        """x0 of the batch: the mixture's samples for the batch's classes, or cached teacher endpoints."""
        if self.config.data in ("teacher", "trajectory"):
            return batch["x0"].to(self.device)
        mixture = self.teacher.mixture
        labels = batch["cond_index"].cpu() if mixture.conditional else None
        return mixture.sample(len(cond), labels).to(self.device)

    # ------------------------------------------------------------------ pieces of the algorithm
    def scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """c_skip(t), c_out(t) of the lowest segment (LCM §4.2, LCMScheduler's discrete form)."""
        return self.teacher.schedule.boundary_scalings(t, self.config.sigma_data, self.config.timestep_scaling)

    def solver_end(self, t: Tensor) -> Tensor:
        """s = t - k: one skipping step of the teacher's solver towards data (t_{n+k} -> t_n)."""
        return (t - self.skip).clamp(min=0)

    def student_fields(self, cond: Cond, w: Tensor) -> dict[str, Tensor]:
        fields = dict(cond.fields)
        if self.config.guidance_embedding_dim:
            fields["timestep_cond"] = guidance_embedding(w, self.config.guidance_embedding_dim)
        return fields

    def consistency_map(self, net: nn.Module, x_t: Tensor, t: Tensor, boundary: Tensor,
                        fields: dict[str, Tensor]) -> Tensor:
        """F(x_t, t): to clean data with c_skip/c_out (boundary -1), else DDIM to the boundary timestep."""
        schedule = self.teacher.schedule
        out = self.teacher.call(net, x_t, t, fields)
        x0, eps = schedule.to_x0_eps(out, x_t, t, self.generator.prediction_type)
        c_skip, c_out = self.scalings(t)
        to_clean = _bcast(c_skip, x0).float() * x_t.float() + _bcast(c_out, x0).float() * x0
        to_edge = schedule.ddim_step(x0, eps, boundary.clamp(min=0))
        return torch.where(_bcast(boundary < 0, x0), to_clean, to_edge)

    @torch.no_grad()
    def solver_step(self, x_t: Tensor, t: Tensor, s: Tensor, cond: Cond, w: Tensor) -> Tensor:
        """x_s = DDIM_{t->s} of the teacher with CFG (1 + omega) cond - omega uncond on x0 and eps (LCM Eq. 8)."""
        guidance = 1.0 + w if cond.fields else 1.0
        pred = self.teacher.predict(x_t, t, cond, guidance, net=self._base[0] if self._base else None)
        return self.teacher.schedule.ddim_step(pred.x0, pred.eps, s)

    def target_net(self) -> nn.Module:
        return self.generator.backbone if self.target_backbone is None else self.target_backbone

    def consistency_target(self, x_s: Tensor, s: Tensor, boundary: Tensor, fields: dict[str, Tensor]) -> Tensor:
        """F_{theta^-}(x_s, s) without gradient; x_s itself where s is an upper segment's boundary."""
        with torch.no_grad():
            target = self.consistency_map(self.target_net(), x_s, s, boundary, fields)
        return torch.where(_bcast(s == boundary, x_s), x_s.float(), target)

    # ------------------------------------------------------------------ training step
    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        c, schedule, device = self.config, self.teacher.schedule, self.device
        cond = self.source.encode(batch["cond_index"]).to(device)
        x0 = self.clean_samples(batch, cond)
        n = x0.shape[0]
        index = torch.randint(0, len(self.grid), (n,), device="cpu")
        t, boundary = self.grid[index].to(device), self.boundaries[index].to(device)
        s = self.solver_end(t)
        if c.data == "trajectory":  # the teacher's own state at t (states run down the grid: 999 first)
            x_t = batch["states"][torch.arange(n), len(self.grid) - 1 - index].to(device)
        else:
            x_t = schedule.add_noise(x0, torch.randn_like(x0), t)
        w = c.w_min + (c.w_max - c.w_min) * torch.rand(n, device=device)
        fields = self.student_fields(cond, w)
        pred = self.consistency_map(self.generator.backbone, x_t, t, boundary, fields)
        x_s = self.solver_step(x_t, t, s, cond, w)
        target = self.consistency_target(x_s, s, boundary, fields)
        return {"loss": reconstruction_loss(pred, target, c.loss, c.huber_c)}

    @torch.no_grad()
    def after_step(self, phase: str, step: int) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta on the trainable parameters (LCM Algorithm 1)."""
        if self.target_backbone is None:
            return
        online = dict(unwrap(self.generator.backbone).named_parameters())
        for name, p_target in self.target_backbone.named_parameters():
            p = online[name]
            if p.requires_grad:
                p_target.lerp_(p.detach().to(p_target.dtype), 1.0 - self.config.ema_decay)

    def load_student_state(self, state: dict[str, Tensor]) -> None:
        """Start from another run's student weights (a previous stage); the EMA target restarts from them."""
        unwrap(self.generator.backbone).load_state_dict(state)
        if self.target_backbone is not None:
            self.target_backbone.load_state_dict(state)

    def checkpoint_modules(self) -> list[nn.Module]:
        """The EMA target: state beyond the optimizers that a resume must restore."""
        return [] if self.target_backbone is None else [self.target_backbone]
