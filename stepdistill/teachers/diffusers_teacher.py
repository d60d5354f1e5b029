"""Teachers backed by diffusers pipelines: SD1.x/2.x and SDXL (UNet), PixArt (DiT) and SD3-style flow transformers
(Flux.1: flux.py).

Prompts are encoded with the pipeline's own `encode_prompt`, so the conditioning equals what the pipeline feeds
its backbone; the null prompt is "" (zeros for SDXL with `force_zeros_for_empty_prompt`, as the SDXL pipeline,
DMD2 and LCM do). The frozen backbone runs in bf16 on CUDA and fp32 on CPU; outputs are always fp32.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from stepdistill.schedules import NoiseSchedule
from stepdistill.teachers.base import Cond, Teacher

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DiffusersTeacher(Teacher):
    """A frozen diffusers pipeline behind the Teacher interface; subclasses know how to condition the backbone."""

    kind: ClassVar[str]
    backbone_name: ClassVar[str]  # the pipeline component that denoises ("unet" or "transformer")
    needs_prompts = True

    def __init__(self, pipe, identity: str = "", device: torch.device | str = "cpu") -> None:
        self.pipe = pipe
        self.device = torch.device(device)
        self.identity = identity or f"{self.kind}:{type(pipe).__name__}"
        for component in pipe.components.values():
            if isinstance(component, nn.Module):
                component.requires_grad_(False).eval()
        self.backbone: nn.Module = getattr(pipe, self.backbone_name)
        self.resolution_multiple = self.vae_scale() * self._patch_size()
        self.sample_shape = self._default_sample_shape()
        self.schedule = self._schedule()
        self._cache: dict[str, dict[str, Tensor]] = {}  # per prompt string, batch of 1, on CPU
        self._null: dict[str, Tensor] | None = None

    def _default_sample_shape(self) -> tuple[int, int, int]:
        """One latent at the backbone's native resolution (its config's sample_size)."""
        size = self.backbone.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return self.backbone.config.in_channels, height, width

    def _schedule(self) -> NoiseSchedule:
        """The noise schedule of the pipeline's scheduler."""
        return NoiseSchedule.from_scheduler_config(self.pipe.scheduler.config)

    def vae_scale(self) -> int:
        """Image pixels per latent pixel along a side (a video VAE's spatial factor)."""
        return self.pipe.vae_scale_factor

    @property
    def pixel_size(self) -> int:
        """The side in pixels of the teacher's (square) samples."""
        return self.sample_shape[-1] * self.vae_scale()

    @property
    def condition_image_size(self) -> int:
        """The side in pixels of an image-conditioned teacher's conditioning images."""
        return self.pixel_size

    def pipeline_call_kwargs(self) -> dict:
        """What the pipeline's call needs beyond the sampling recipe to produce this teacher's samples (a video
        pipeline's frame count and size, whose call defaults are the full-size model's)."""
        return {}

    def _patch_size(self) -> int:
        """Latent pixels per backbone token side: the patch size of DiT/MMDiT transformers, 1 for UNets (which
        take any latent size)."""
        return int(self.backbone.config.get("patch_size") or 1)

    def set_resolution(self, pixels: int) -> None:
        """Produce `pixels` x `pixels` images: latents of side pixels / vae_scale_factor (data.resolution)."""
        if pixels % self.resolution_multiple:
            fit = max(self.resolution_multiple, round(pixels / self.resolution_multiple) * self.resolution_multiple)
            raise ValueError(f"data.resolution={pixels} is not a multiple of {self.resolution_multiple}, which the "
                             f"teacher's VAE and backbone need: use e.g. data.resolution={fit}")
        side = pixels // self.vae_scale()
        self.sample_shape = (*self.sample_shape[:-2], side, side)

    # ------------------------------------------------------------------ conditioning
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """Backbone keyword tensors for a batch of prompts."""
        raise NotImplementedError

    def _encode_null(self) -> dict[str, Tensor]:
        """Fields of the null (unconditional) prompt, batch of 1: the pipeline's default negative prompt ""."""
        return self._encode([""])

    def fields_like(self, batch_size: int, device: torch.device | str) -> dict[str, Tensor]:
        """Conditioning fields of this teacher's shapes with random values, without running a text encoder (the
        memory planner traces with them on the meta device)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: Sequence[str] | str, cache: bool = True) -> Cond:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"{type(self).__name__}.encode takes prompt strings, got {type(prompts[0]).__name__}")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        encoded: dict[str, dict[str, Tensor]] = {}
        if missing:  # one prompt per call: an embedding must not depend on the batch it was first encoded in (the
            # matmul kernels round by batch shape), or a resumed run, whose cache fills in another order, differs
            encoded = {p: {k: v.cpu() for k, v in self._encode([p]).items()} for p in missing}
            if cache:
                self._cache.update(encoded)
        if self._null is None:
            self._null = {k: v.cpu() for k, v in self._encode_null().items()}
        n = len(prompts)
        fields = {k: torch.cat([(encoded.get(p) or self._cache[p])[k] for p in prompts]) for k in self._null}
        null = {k: v.expand(n, *v.shape[1:]) for k, v in self._null.items()}
        return Cond(fields, null, n).to(self.device)

    # ------------------------------------------------------------------ backbone calls
    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> Tensor:
        """The backbone's raw output for inputs already in its dtype."""
        raise NotImplementedError

    def call(self, net: nn.Module, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> Tensor:
        dtype = next(net.parameters()).dtype
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)  # fp32: bf16 would round 999 to 1000
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        fields = {k: v.to(x_t.device, dtype) if v.is_floating_point() else v.to(x_t.device)
                  for k, v in fields.items()}
        return self._forward(net, x_t.to(dtype), t, fields).float()

    def model_output(self, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> Tensor:
        return self.call(self.backbone, x_t, t, fields)

    def share_backbone(self, net: nn.Module) -> None:
        """Denoise with `net` (a LoRA student's base view) and drop the teacher's own backbone."""
        self.backbone = net
        setattr(self.pipe, self.backbone_name, net)

    def build_backbone(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return copy.deepcopy(self.backbone).to(dtype).requires_grad_(True).train()

    # ------------------------------------------------------------------ images and export
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images [B, 3, H, W] in [0, 1] through the VAE (x = z / scaling_factor + shift_factor)."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
        return (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)



class SDTeacher(DiffusersTeacher):
    """SD1.x / 2.x: UNet2DConditionModel on CLIP hidden states (eps or v prediction, from the scheduler)."""

    kind = "sd"
    backbone_name = "unet"

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def fields_like(self, batch_size, device):
        length, width = self.pipe.tokenizer.model_max_length, self.backbone.config.cross_attention_dim
        return {"encoder_hidden_states": torch.randn(batch_size, length, width, device=device)}

    def _forward(self, net, x_t, t, fields):
        return net(x_t, t, encoder_hidden_states=fields["encoder_hidden_states"],
                   timestep_cond=fields.get("timestep_cond"), return_dict=False)[0]


class SDXLTeacher(DiffusersTeacher):
    """SDXL: two CLIP encoders, pooled `text_embeds` and micro-conditioning `time_ids` as added_cond_kwargs."""

    kind = "sdxl"
    backbone_name = "unet"

    def _time_ids(self, n: int) -> Tensor:
        # SDXL micro-conditioning (original_size, crop top-left, target_size) = the pipeline's defaults at its
        # default resolution, latent size x vae_scale_factor.
        h, w = (s * self.pipe.vae_scale_factor for s in self.sample_shape[1:])
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device).expand(n, 6)

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": self._time_ids(len(prompts))}

    def fields_like(self, batch_size, device):
        length, width = self.pipe.tokenizer.model_max_length, self.backbone.config.cross_attention_dim
        pooled = self.pipe.text_encoder_2.config.projection_dim
        return {"encoder_hidden_states": torch.randn(batch_size, length, width, device=device),
                "text_embeds": torch.randn(batch_size, pooled, device=device),
                "time_ids": self._time_ids(batch_size).to(device)}

    def _encode_null(self) -> dict[str, Tensor]:
        fields = self._encode([""])
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            fields["encoder_hidden_states"] = torch.zeros_like(fields["encoder_hidden_states"])
            fields["text_embeds"] = torch.zeros_like(fields["text_embeds"])
        return fields

    def _forward(self, net, x_t, t, fields):
        added = {"text_embeds": fields["text_embeds"], "time_ids": fields["time_ids"]}
        return net(x_t, t, encoder_hidden_states=fields["encoder_hidden_states"], added_cond_kwargs=added,
                   timestep_cond=fields.get("timestep_cond"), return_dict=False)[0]


class PixArtTeacher(DiffusersTeacher):
    """PixArt-alpha/sigma: PixArtTransformer2DModel on T5 states; learned-sigma outputs keep their first half."""

    kind = "pixart"
    backbone_name = "transformer"
    max_sequence_length = 120  # PixArtAlphaPipeline's default

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device,
                                                     clean_caption=False,
                                                     max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, **self._size_fields(len(prompts))}

    def _size_fields(self, n: int) -> dict[str, Tensor]:
        if self.backbone.config.sample_size != 128:  # the 1024px models take resolution/aspect-ratio conditions
            return {}
        h, w = (s * self.pipe.vae_scale_factor for s in self.sample_shape[1:])
        return {"resolution": torch.tensor([[h, w]], dtype=torch.float32).repeat(n, 1),
                "aspect_ratio": torch.tensor([[h / w]], dtype=torch.float32).repeat(n, 1)}

    def fields_like(self, batch_size, device):
        length, width = self.max_sequence_length, self.backbone.config.caption_channels
        return {"encoder_hidden_states": torch.randn(batch_size, length, width, device=device),
                "encoder_attention_mask": torch.ones(batch_size, length, dtype=torch.long, device=device),
                **{k: v.to(device) for k, v in self._size_fields(batch_size).items()}}

    def _forward(self, net, x_t, t, fields):
        added = {"resolution": fields.get("resolution"), "aspect_ratio": fields.get("aspect_ratio")}
        out = net(x_t, encoder_hidden_states=fields["encoder_hidden_states"], timestep=t, added_cond_kwargs=added,
                  encoder_attention_mask=fields["encoder_attention_mask"], return_dict=False)[0]
        if out.shape[1] == 2 * x_t.shape[1]:  # learned sigma: [eps, variance]
            out = out.chunk(2, dim=1)[0]
        return out


class SD3Teacher(DiffusersTeacher):
    """SD3-style rectified flow: SD3Transformer2DModel predicting velocity eps - x0 at t = 1000 sigma."""

    kind = "sd3"
    backbone_name = "transformer"
    max_sequence_length = 256  # StableDiffusion3Pipeline's default

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        # text_encoder_3 may be None: the pipeline then uses zeros in place of the T5 states
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def fields_like(self, batch_size, device):
        # the CLIP states (77 tokens, zero-padded to the joint width) followed by the T5 states
        length = self.pipe.tokenizer.model_max_length + self.max_sequence_length
        config = self.backbone.config
        return {"encoder_hidden_states": torch.randn(batch_size, length, config.joint_attention_dim, device=device),
                "pooled_projections": torch.randn(batch_size, config.pooled_projection_dim, device=device)}

    def _forward(self, net, x_t, t, fields):
        return net(hidden_states=x_t, timestep=t, encoder_hidden_states=fields["encoder_hidden_states"],
                   pooled_projections=fields["pooled_projections"], return_dict=False)[0]


TEACHERS: dict[str, type[DiffusersTeacher]] = {c.kind: c for c in (SDTeacher, SDXLTeacher, PixArtTeacher, SD3Teacher)}


def detect_kind(pipe) -> str:
    """sd | sdxl | pixart | sd3 | flux from the pipeline's denoiser (its class and added conditioning)."""
    unet, transformer = getattr(pipe, "unet", None), getattr(pipe, "transformer", None)
    if unet is not None and type(unet).__name__ == "UNet2DConditionModel":
        if type(pipe).__name__ == "StableDiffusionUpscalePipeline":
            return "sd_upscale"
        return "sdxl" if unet.config.get("addition_embed_type") == "text_time" else "sd"
    name = type(transformer).__name__ if transformer is not None else ""
    if name == "PixArtTransformer2DModel":
        return "pixart"
    if name == "SD3Transformer2DModel":
        return "sd3"
    if name == "FluxTransformer2DModel":
        return "flux"
    if name == "WanTransformer3DModel":
        return "wan_i2v" if type(pipe).__name__ == "WanImageToVideoPipeline" else "wan"
    raise ValueError(f"{type(pipe).__name__} is not a supported teacher: stepdistill handles SD1.x/2.x and SDXL "
                     "(UNet2DConditionModel), SD's x4 upscaler, PixArt (PixArtTransformer2DModel), SD3 (SD3Transformer2DModel), "
                     "Flux.1 (FluxTransformer2DModel) and Wan 2.1 text- and image-to-video (WanTransformer3DModel)")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_pipeline(path: str, local_files_only: bool = False, revision: str = "", variant: str = "",
                  dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """`DiffusionPipeline.from_pretrained` on a local folder or hub id, with errors that say what to pass."""
    from diffusers import DiffusionPipeline

    if not path:
        raise ValueError("teacher.path is empty: set teacher.path to a diffusers pipeline folder or a hub id, "
                         "e.g. teacher.path=/path/to/pipeline_folder")
    # the VAE only decodes pictures: fp32 avoids the fp16/bf16 NaN / black-image problem
    kwargs = {"dtype": {"default": dtype, "vae": torch.float32}, "local_files_only": local_files_only}
    if trust_remote_code:  # custom component code, allowed only after the config check named it
        kwargs["trust_remote_code"] = True
    if revision:
        kwargs["revision"] = revision
    if variant:
        kwargs["variant"] = variant
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"teacher.path {str(folder)!r} is a folder but not a diffusers pipeline (no model_index.json). Pass "
                "the folder that `pipe.save_pretrained(...)` or `hf download <repo> --local-dir DIR` "
                "wrote, the one holding model_index.json: teacher.path=/path/to/pipeline_folder")
        return DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    try:
        return DiffusionPipeline.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # hub errors: not cached / offline / not found / malformed id
        raise FileNotFoundError(
            f"teacher.path {path!r} is not a local folder and could not be loaded as a hub id (offline, not in the "
            f"local cache, or not a diffusers pipeline): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            "\nDownload it where there is network (`hf download <repo> --local-dir DIR`, or "
            "`DiffusionPipeline.from_pretrained(<repo>).save_pretrained(DIR)`) and pass the local folder: "
            "teacher.path=/path/to/pipeline_folder"
        ) from e
