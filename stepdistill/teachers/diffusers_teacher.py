"""Teachers backed by diffusers pipelines: SD1.x/2.x and SDXL (UNet), PixArt (DiT) and SD3-style flow transformers.

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
        self.resolution_multiple = pipe.vae_scale_factor * self._patch_size()
        self.schedule = NoiseSchedule.from_scheduler_config(pipe.scheduler.config)
        size = self.backbone.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (self.backbone.config.in_channels, height, width)
        self._cache: dict[str, dict[str, Tensor]] = {}  # per prompt string, batch of 1, on CPU
        self._null: dict[str, Tensor] | None = None

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
        side = pixels // self.pipe.vae_scale_factor
        self.sample_shape = (self.sample_shape[0], side, side)

    # ------------------------------------------------------------------ conditioning
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """Backbone keyword tensors for a batch of prompts."""
        raise NotImplementedError

    def _encode_null(self) -> dict[str, Tensor]:
        """Fields of the null (unconditional) prompt, batch of 1: the pipeline's default negative prompt ""."""
        return self._encode([""])

    @torch.no_grad()
    def encode(self, prompts: Sequence[str] | str, cache: bool = True) -> Cond:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"{type(self).__name__}.encode takes prompt strings, got {type(prompts[0]).__name__}")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        encoded: dict[str, dict[str, Tensor]] = {}
        if missing:
            fields = self._encode(missing)
            encoded = {p: {k: v[i:i + 1].cpu() for k, v in fields.items()} for i, p in enumerate(missing)}
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

    def build_backbone(self) -> nn.Module:
        return copy.deepcopy(self.backbone).to(torch.float32).requires_grad_(True).train()

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
        fields = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        if self.backbone.config.sample_size == 128:  # the 1024px models take resolution/aspect-ratio conditions
            h, w = (s * self.pipe.vae_scale_factor for s in self.sample_shape[1:])
            fields["resolution"] = torch.tensor([[h, w]], dtype=torch.float32).repeat(len(prompts), 1)
            fields["aspect_ratio"] = torch.tensor([[h / w]], dtype=torch.float32).repeat(len(prompts), 1)
        return fields

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

    def _forward(self, net, x_t, t, fields):
        return net(hidden_states=x_t, timestep=t, encoder_hidden_states=fields["encoder_hidden_states"],
                   pooled_projections=fields["pooled_projections"], return_dict=False)[0]


TEACHERS: dict[str, type[DiffusersTeacher]] = {c.kind: c for c in (SDTeacher, SDXLTeacher, PixArtTeacher, SD3Teacher)}


def detect_kind(pipe) -> str:
    """sd | sdxl | pixart | sd3 from the pipeline's denoiser (its class and added conditioning)."""
    unet, transformer = getattr(pipe, "unet", None), getattr(pipe, "transformer", None)
    if unet is not None and type(unet).__name__ == "UNet2DConditionModel":
        return "sdxl" if unet.config.get("addition_embed_type") == "text_time" else "sd"
    name = type(transformer).__name__ if transformer is not None else ""
    if name == "PixArtTransformer2DModel":
        return "pixart"
    if name == "SD3Transformer2DModel":
        return "sd3"
    raise ValueError(f"{type(pipe).__name__} is not a supported teacher: stepdistill handles SD1.x/2.x and SDXL "
                     "(UNet2DConditionModel), PixArt (PixArtTransformer2DModel) and SD3 (SD3Transformer2DModel)")


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
                "the folder that `pipe.save_pretrained(...)` or `huggingface-cli download <repo> --local-dir DIR` "
                "wrote, the one holding model_index.json: teacher.path=/path/to/pipeline_folder")
        return DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    try:
        return DiffusionPipeline.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # hub errors: not cached / offline / not found / malformed id
        raise FileNotFoundError(
            f"teacher.path {path!r} is not a local folder and could not be loaded as a hub id (offline, not in the "
            f"local cache, or not a diffusers pipeline): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            "\nDownload it where there is network (`huggingface-cli download <repo> --local-dir DIR`, or "
            "`DiffusionPipeline.from_pretrained(<repo>).save_pretrained(DIR)`) and pass the local folder: "
            "teacher.path=/path/to/pipeline_folder"
        ) from e


def load_diffusers_teacher(cfg, device: torch.device | str = "cpu") -> DiffusersTeacher:
    """The teacher a TeacherConfig (kind sd|sdxl|pixart|sd3|auto) describes, loaded onto `device`."""
    device = torch.device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    pipe = load_pipeline(cfg.path, cfg.local_files_only, cfg.revision, cfg.variant, dtype, cfg.trust_remote_code)
    kind = detect_kind(pipe)
    if cfg.kind not in ("auto", kind):
        raise ValueError(f"teacher.kind is {cfg.kind!r} but {cfg.path} holds a {kind} pipeline "
                         f"({type(pipe).__name__}): set teacher.kind={kind} or teacher.kind=auto")
    pipe.to(device)
    identity = ":".join(x for x in (kind, cfg.path, cfg.revision, cfg.variant, str(dtype).split(".")[-1]) if x)
    return TEACHERS[kind](pipe, identity, device)
