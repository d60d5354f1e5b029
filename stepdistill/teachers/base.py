"""The teacher adapter: one interface over eps / v / flow denoisers, classifier-free guidance and encoding.

In the spirit of k-diffusion's `external.py`: objectives ask a teacher for `predict(x_t, t, cond, guidance)`
and never see how the backbone is parameterized or conditioned. The same teacher also knows how to call any
backbone of its architecture (`call`), which is how students and fake-score critics built from it are run.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from stepdistill.guidance import apply_guidance
from stepdistill.schedules import NoiseSchedule


def _cat_fields(parts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@dataclass
class Cond:
    """Conditioning of a batch: backbone keyword tensors for the prompts (`fields`) and for the null prompt
    (`null`, same batch size), so that guidance is one batched call."""

    fields: dict[str, Tensor] = field(default_factory=dict)
    null: dict[str, Tensor] = field(default_factory=dict)
    batch_size: int = 0

    def __len__(self) -> int:
        return self.batch_size

    def index(self, idx: Tensor | slice) -> Cond:
        fields = {k: v[idx] for k, v in self.fields.items()}
        null = {k: v[idx] for k, v in self.null.items()}
        n = len(range(self.batch_size)[idx]) if isinstance(idx, slice) else int(torch.as_tensor(idx).numel())
        return Cond(fields, null, n)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Cond:
        def move(v: Tensor) -> Tensor:
            return v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)

        return Cond({k: move(v) for k, v in self.fields.items()}, {k: move(v) for k, v in self.null.items()},
                    self.batch_size)

    def dropped(self, drop: Tensor) -> Cond:
        """This conditioning with the samples where `drop` [N] is true conditioned on the null prompt instead."""
        fields = {}
        for k, v in self.fields.items():
            mask = drop.to(v.device).reshape(-1, *([1] * (v.ndim - 1)))
            fields[k] = torch.where(mask, self.null[k], v)
        return Cond(fields, self.null, self.batch_size)

    def null_with_prob(self, p: float) -> Cond:
        """This conditioning with each sample's condition replaced by the null one with probability p (prompt
        dropout), drawn on the conditioning's device."""
        if p == 0 or not self.fields:
            return self
        return self.dropped(torch.rand(self.batch_size, device=next(iter(self.fields.values())).device) < p)

    def with_shared(self, extra: dict[str, Tensor]) -> Cond:
        """This conditioning with `extra` fields in both branches: conditions that guidance does not drop (an
        image-to-video teacher's first frame)."""
        return Cond({**self.fields, **extra}, {**self.null, **extra}, self.batch_size)

    def with_null(self) -> dict[str, Tensor]:
        """[null; fields] concatenated along the batch: the inputs of one guided forward pass."""
        return _cat_fields([self.null, self.fields]) if self.fields else {}

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        if not conds[0].fields:
            return Cond({}, {}, sum(c.batch_size for c in conds))
        return Cond(_cat_fields([c.fields for c in conds]), _cat_fields([c.null for c in conds]),
                    sum(c.batch_size for c in conds))


@dataclass
class Prediction:
    x0: Tensor
    eps: Tensor


class Teacher(ABC):
    """A frozen diffusion model behind one interface. Capabilities are declared here with their defaults (a
    teacher that has a pipeline, a network backbone or images says so), never probed with hasattr."""

    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]  # one sample's latent shape, without the batch dimension
    device: torch.device = torch.device("cpu")
    identity: str = ""  # what cached teacher outputs are keyed by (kind, path, revision, dtype)
    needs_prompts: bool = False  # conditions are prompt strings (else class labels)
    num_classes: int = 0  # class-conditional teachers: the number of classes (the null class is num_classes)
    backbone: nn.Module | None = None  # the frozen denoising network, where there is one
    backbone_name: str = ""  # its component name in the pipeline ("unet" | "transformer")
    pipe = None  # the diffusers pipeline, where the teacher is one (export reuses its components)
    resolution_multiple: int | None = None  # image side lengths must be multiples of this (latent teachers)
    mixture = None  # the true data distribution, where the teacher knows it (the analytic GMM teacher)
    # a guidance-distilled backbone (Flux-dev) takes its guidance scale as an input: the value every conditioning
    # carries by default, so students are trained at it and their exports pass it as the pipeline's guidance_scale
    embedded_guidance: float | None = None
    makes_video: bool = False  # samples are clips: latents (C, F, H, W), decoded to [B, 3, F, H, W]
    image_conditioned: bool = False  # each condition is a prompt with an image (image-to-video: the first frame)

    @property
    def makes_images(self) -> bool:
        """Whether samples decode to images (a latent teacher with a VAE)."""
        return self.resolution_multiple is not None

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images [B, 3, H, W] in [0, 1]."""
        raise ValueError(f"the {type(self).__name__} teacher does not make images")

    def set_resolution(self, pixels: int) -> None:
        """Produce `pixels` x `pixels` images (data.resolution)."""
        raise ValueError(f"data.resolution={pixels}: the {type(self).__name__} teacher does not make images; set "
                         "data.resolution=0")

    def image_fields(self, images: Tensor) -> dict[str, Tensor]:
        """Backbone keyword tensors of conditioning images [B, 3, H, W] in [0, 1] (image-conditioned teachers)."""
        raise ValueError(f"the {type(self).__name__} teacher is not conditioned on images")

    def set_num_frames(self, num_frames: int) -> None:
        """Produce clips of `num_frames` frames (data.num_frames)."""
        raise ValueError(f"data.num_frames={num_frames}: the {type(self).__name__} teacher makes still images; set "
                         "data.num_frames=0 or use a video teacher (teacher.kind=wan)")

    def share_backbone(self, net: nn.Module) -> None:
        """Denoise with `net` (a LoRA network's base view) instead of the teacher's own backbone, which is dropped:
        one set of frozen weights in memory."""
        raise ValueError(f"the {type(self).__name__} teacher has no network backbone to share")

    def probe_condition(self) -> list:
        """One condition of this teacher's kind (the null prompt or class 0), for shape probes."""
        return [""] if self.needs_prompts else [0]

    @abstractmethod
    def encode(self, prompts: Sequence | Tensor, cache: bool = True) -> Cond:
        """Conditioning for prompts (strings) or class labels; kept for later calls where encoding is expensive,
        unless `cache` is off (one pass over many conditions: routing every prompt of a large file)."""

    @abstractmethod
    def call(self, net: nn.Module, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> Tensor:
        """Raw output of a backbone of this teacher's architecture (in its parameterization), as fp32."""

    @abstractmethod
    def model_output(self, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> Tensor:
        """Raw output of the frozen teacher itself, as fp32."""

    @abstractmethod
    def build_backbone(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A trainable backbone of the teacher's architecture in `dtype` (fp32; a LoRA's frozen base: the teacher's
        own dtype), initialized from the teacher where it has weights (the start of students and fake scores)."""

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The dtype of the frozen backbone (bf16 on a GPU): what a LoRA student's frozen base is kept in."""
        return torch.float32 if self.backbone is None else next(self.backbone.parameters()).dtype

    def guided_output(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: float | Tensor = 1.0,
                      net: nn.Module | None = None) -> Tensor:
        """Raw output with classifier-free guidance, the conditional and null branches in one batched call."""
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0]) if torch.as_tensor(t).ndim == 0 else t

        def run(x: Tensor, tt: Tensor, fields: dict[str, Tensor]) -> Tensor:
            return self.model_output(x, tt, fields) if net is None else self.call(net, x, tt, fields)

        if isinstance(guidance, (int, float)) and guidance == 1.0:
            return run(x_t, t, cond.fields)
        out_uncond, out_cond = run(torch.cat([x_t, x_t]), torch.cat([t, t]), cond.with_null()).chunk(2)
        return apply_guidance(out_uncond, out_cond, guidance)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: float | Tensor = 1.0,
                net: nn.Module | None = None, dtype: torch.dtype = torch.float32) -> Prediction:
        """(x0_hat, eps_hat) of the teacher (or of `net` of its architecture) with guidance, in `dtype`."""
        out = self.guided_output(x_t, t, cond, guidance, net)
        x0, eps = self.schedule.to_x0_eps(out, x_t, t, dtype=dtype)
        return Prediction(x0, eps)

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Cond, num_steps: int = 50, guidance: float = 1.0) -> Tensor:
        """The teacher's own deterministic ODE sampler (DDIM, trailing spacing / flow Euler) from pure noise."""
        for x in self.ode_states(noise, cond, self.schedule.inference_timesteps(num_steps), guidance):
            pass
        return x

    @torch.no_grad()
    def ode_states(self, noise: Tensor, cond: Cond, timesteps: list[float], guidance: float = 1.0
                   ) -> Iterator[Tensor]:
        """The states of the deterministic sampler over descending `timesteps`: x_{t_0} (the pure noise, as
        diffusers pipelines start), x_{t_1}, ..., then the clean endpoint."""
        x = noise.to(torch.float32)
        yield x
        for i, t in enumerate(timesteps):
            t_vec = torch.full((x.shape[0],), t, device=x.device)
            pred = self.predict(x, t_vec, cond, guidance)
            t_prev = torch.full_like(t_vec, timesteps[i + 1]) if i + 1 < len(timesteps) else None
            x = self.schedule.ddim_step(pred.x0, pred.eps, t_prev)
            yield x


def apply_data_shape(teacher: Teacher, data) -> None:
    """The sample size a DataConfig asks of the teacher (data.resolution, data.num_frames; 0 keeps its default)."""
    if data.resolution:
        teacher.set_resolution(data.resolution)
    if data.num_frames:
        teacher.set_num_frames(data.num_frames)
