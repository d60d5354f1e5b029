"""Flux.1 teachers (dev and schnell): FluxTransformer2DModel behind the Teacher adapter.

What differs from SD3, all kept inside this adapter so objectives see (B, C, H, W) latents and ask for "guided
x0" as with any teacher:
  * packed latents: the transformer takes 2x2 latent patches as tokens (B, H/2 * W/2, 4C) with rotary position ids
    (`img_ids`; text tokens get zero ids, `txt_ids`); `call` packs and unpacks with the pipeline's own helpers, so
    any backbone of the architecture (a student, a fake score) runs through it unchanged.
  * the resolution-dependent shift (use_dynamic_shifting): the flow shift is exp(mu), mu linear in the image's
    token count (schedules.resolution_shift); the schedule is rebuilt when the resolution changes.
  * the timestep and guidance inputs are fractions (the transformer multiplies both by 1000): t / T is passed.
  * Flux-dev's distilled guidance embedding in place of classifier-free guidance: the "guided" output at scale g
    is one call with the embedded guidance g, no null branch. Every conditioning carries a `guidance` field at
    `default_guidance` (3.5, FluxPipeline's default `guidance_scale`): students and fake scores see it, so an
    export sampled by `pipe(prompt)` gets the value it was trained at. Flux-schnell has no guidance embedding and
    gets the standard CFG of the base class. docs/FLUX.md says how DMD2, VSD and LCM use this.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from stepdistill.schedules import NoiseSchedule
from stepdistill.teachers.base import Cond
from stepdistill.teachers.diffusers_teacher import DiffusersTeacher


class FluxTeacher(DiffusersTeacher):
    """Flux.1 rectified flow: velocity eps - x0 at t = 1000 sigma, on packed latents, guidance embedded (dev)."""

    kind = "flux"
    backbone_name = "transformer"
    max_sequence_length = 512  # FluxPipeline's default T5 length
    default_guidance = 3.5  # FluxPipeline's default guidance_scale: the embedded guidance of students and critics

    def __init__(self, pipe, identity: str = "", device: torch.device | str = "cpu") -> None:
        super().__init__(pipe, identity, device)
        self.guidance_embeds = bool(self.backbone.config.guidance_embeds)
        self.embedded_guidance = self.default_guidance if self.guidance_embeds else None

    def _patch_size(self) -> int:
        return 2  # latents are packed in 2x2 patches (the transformer's own patch_size is 1)

    def _default_sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one unpacked latent at the VAE's native resolution (1024 px: 16 x 128 x 128 for Flux.1)."""
        side = self.pipe.vae.config.sample_size // self.pipe.vae_scale_factor
        return self.backbone.config.in_channels // 4, side, side

    def image_seq_len(self) -> int:
        """Packed image tokens at the current resolution: what the dynamic shift depends on."""
        return (self.sample_shape[1] // 2) * (self.sample_shape[2] // 2)

    def _schedule(self) -> NoiseSchedule:
        # FluxPipeline samples sigmas = linspace(1, 1/n, n), shifted at this resolution
        return NoiseSchedule.from_scheduler_config(self.pipe.scheduler.config, self.image_seq_len(), "flux")

    def set_resolution(self, pixels: int) -> None:
        super().set_resolution(pixels)
        self.schedule = self._schedule()

    # ------------------------------------------------------------------ conditioning
    def _guidance_field(self, n: int) -> dict[str, Tensor]:
        if not self.guidance_embeds:
            return {}
        return {"guidance": torch.full((n,), self.embedded_guidance, device=self.device)}

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, **self._guidance_field(len(prompts))}

    def fields_like(self, batch_size: int, device: torch.device | str) -> dict[str, Tensor]:
        config = self.backbone.config
        return {"encoder_hidden_states": torch.randn(batch_size, self.max_sequence_length, config.joint_attention_dim,
                                                     device=device),
                "pooled_projections": torch.randn(batch_size, config.pooled_projection_dim, device=device),
                **{k: v.to(device) for k, v in self._guidance_field(batch_size).items()}}

    # ------------------------------------------------------------------ backbone calls
    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> Tensor:
        pipe_class = type(self.pipe)
        b, c, h, w = x_t.shape
        text = fields["encoder_hidden_states"]
        out = net(hidden_states=pipe_class._pack_latents(x_t, b, c, h, w),
                  timestep=t / self.schedule.num_train_timesteps,
                  guidance=fields["guidance"] if self.guidance_embeds else None,
                  pooled_projections=fields["pooled_projections"], encoder_hidden_states=text,
                  txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
                  img_ids=pipe_class._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype),
                  return_dict=False)[0]
        scale = self.pipe.vae_scale_factor
        return pipe_class._unpack_latents(out, h * scale, w * scale, scale)

    def guided_output(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: float | Tensor = 1.0,
                      net: nn.Module | None = None) -> Tensor:
        """Flux-dev: one call at the embedded guidance `guidance` (a scale or one per sample; 1 is the embedded
        value 1, not "off": the distilled model has no unguided branch). Flux-schnell: classifier-free guidance."""
        if not self.guidance_embeds:
            return super().guided_output(x_t, t, cond, guidance, net)
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        fields = dict(cond.fields)
        fields["guidance"] = torch.as_tensor(guidance, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        return self.model_output(x_t, t, fields) if net is None else self.call(net, x_t, t, fields)
