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
Progressive segment schedules (MLCM, Hyper-SD 8 -> 4 -> 2 -> 1) are recipes: stages that each start from the
previous stage's export (`student.init`), run by `stepdistill.recipes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from stepdistill.config.schema import PairsConfig
from stepdistill.data import PairDataset, generate_pairs
from stepdistill.objectives.base import Objective, ObjectiveConfig, OptimizerGroup, reconstruction_loss
from stepdistill.schedules import NoiseSchedule, _bcast
from stepdistill.students import Generator, OdeGenerator, RenoiseGenerator, student_schedule
from stepdistill.students.base import recipe_schedule
from stepdistill.students.build import public_config
from stepdistill.students.lora import BaseNetwork, adapter_layers, frozen_copy
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
    pairs: PairsConfig = field(default_factory=PairsConfig)  # data=teacher|trajectory: the cached teacher samples

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
def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """LCM's w-conditioning: sinusoids of 1000 w with frequencies exp(-log(1e4) j / (dim/2 - 1)), [sin, cos]
    (VDM's embedding, fed to the UNet as `timestep_cond`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32, device=w.device))
    args = 1000.0 * w.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


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


class GuidanceEmbeddedGenerator(RenoiseGenerator):
    """An LCM student whose UNet takes the guidance scale w as an embedding (`timestep_cond`); sampled at one w.
    The diffusers LCM pipelines embed w = guidance_scale - 1 and skip CFG, so the export records w + 1."""

    def __init__(self, backbone: nn.Module, teacher: Teacher, timesteps: list[float], schedule: NoiseSchedule,
                 prediction_type: str | None, w: float) -> None:
        super().__init__(backbone, teacher, timesteps, schedule, prediction_type)
        self.w, self.embedding_dim = w, backbone.config.time_cond_proj_dim

    def fields(self, cond: Cond, z: Tensor) -> dict[str, Tensor]:
        w = torch.full((z.shape[0],), self.w, device=z.device)
        return {**cond.fields, "timestep_cond": guidance_embedding(w, self.embedding_dim)}

    def recipe(self):
        recipe = super().recipe()
        recipe.guidance_scale = self.w + 1.0
        recipe.extra["w"] = self.w
        return recipe

    @classmethod
    def from_recipe(cls, backbone, teacher, recipe):
        return cls(backbone, teacher, recipe["timesteps"], recipe_schedule(teacher, recipe),
                   recipe["prediction_type"], recipe["w"])


# ---------------------------------------------------------------------------------------------- objective
class Consistency(Objective):
    """LCM (S = 1) and multistep consistency distillation (S > 1) with an EMA or online target."""

    name = "consistency"
    config_class = ConsistencyConfig
    config: ConsistencyConfig

    @classmethod
    def build_generator(cls, teacher: Teacher, backbone: nn.Module, student_cfg, config: ConsistencyConfig
                        ) -> Generator:
        """S = 1: the LCM student at `student.timesteps` (with LCM's w embedding, sampled at the middle of the
        trained w range); S > 1: DDIM jumps between the tops of the segments (MCD sampling)."""
        schedule, prediction = student_schedule(teacher, student_cfg), student_cfg.prediction_type
        if config.num_segments > 1:
            grid = schedule.skipping_step_grid(config.num_ddim_timesteps)
            return OdeGenerator(backbone, teacher, segment_timesteps(grid, config.num_segments), schedule, prediction)
        if config.guidance_embedding_dim:
            return GuidanceEmbeddedGenerator(with_guidance_embedding(backbone, config.guidance_embedding_dim),
                                             teacher, student_cfg.timesteps, schedule, prediction,
                                             (config.w_min + config.w_max) / 2)
        return RenoiseGenerator(backbone, teacher, student_cfg.timesteps, schedule, prediction)

    def __init__(self, teacher: Teacher, generator: Generator, source, config: ConsistencyConfig, data=None) -> None:
        if config.w_min > config.w_max:
            raise ValueError(f"objective.w_min ({config.w_min}) must not exceed objective.w_max ({config.w_max})")
        if config.data == "trajectory" and not config.w_min == config.w_max == config.pairs.guidance - 1:
            raise ValueError("objective.data=trajectory caches the teacher's trajectories at one guidance scale: set "
                             "objective.w_min = objective.w_max = objective.pairs.guidance - 1")
        if config.target == "ema" and not 0.0 <= config.ema_decay < 1.0:
            raise ValueError(f"objective.ema_decay must lie in [0, 1), got {config.ema_decay}")
        super().__init__(teacher, generator, source, config, data)
        schedule: NoiseSchedule = teacher.schedule
        self.grid = schedule.skipping_step_grid(config.num_ddim_timesteps)
        self.skip = schedule.num_train_timesteps // config.num_ddim_timesteps
        self.boundaries = segment_boundaries(self.grid, config.num_segments)
        self._base: list[nn.Module] = []  # teacher_net=lora_base: the student's base (a plain list: no submodule)
        if config.teacher_net == "lora_base":
            if not adapter_layers(generator.backbone):
                raise ValueError("objective.teacher_net=lora_base needs a LoRA student (student.kind: lora)")
            self._base.append(BaseNetwork(generator.backbone))
            if teacher.backbone is not None:  # one backbone in memory: the teacher's own copy is dropped
                teacher.share_backbone(self._base[0])
        # the online network itself, kept from before any wrapping (a plain list: no submodule); the EMA update reads
        # its parameters by name at each step, as FSDP2 replaces them with their shards in place
        self._online = [generator.backbone]
        self.target_backbone = frozen_copy(generator.backbone) if config.target == "ema" else None

    @classmethod
    def shares_teacher_backbone(cls, config: ConsistencyConfig) -> bool:
        return config.teacher_net == "lora_base"

    @property
    def reference_guidance(self) -> float:
        """The middle of the omega range, in the standard form (w = 1 + omega)."""
        return 1.0 + 0.5 * (self.config.w_min + self.config.w_max)

    def optimizer_groups(self) -> list[OptimizerGroup]:
        c = self.config
        return [OptimizerGroup("generator", "generator.backbone", c.lr, weight_decay=c.weight_decay,
                               max_grad_norm=c.max_grad_norm)]

    # ------------------------------------------------------------------ data
    def prepare_data(self, output_dir: str | Path, device: str = "cpu") -> None:
        c = self.config
        if c.data == "real":
            if self.teacher.mixture is None:
                raise ValueError("objective.data=real needs a teacher with its own data (the GMM teacher); use "
                                 "objective.data=teacher for data-free distillation on teacher samples")
            return
        states = self.grid.flip(0).tolist() if c.data == "trajectory" else None
        self._pair_dir = generate_pairs(self.teacher, self.source, c.pairs, output_dir, device, states)

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
        online = dict(self._online[0].named_parameters())
        for name, p_target in self.target_backbone.named_parameters():
            p = online[name]
            if p.requires_grad:
                p_target.lerp_(p.detach().to(p_target.dtype), 1.0 - self.config.ema_decay)

    def checkpoint_modules(self) -> list[nn.Module]:
        """The EMA target: state beyond the optimizers that a resume must restore."""
        return [] if self.target_backbone is None else [self.target_backbone]
