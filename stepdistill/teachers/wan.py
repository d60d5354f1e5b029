"""Wan 2.1 text-to-video and image-to-video teachers: WanTransformer3DModel behind the Teacher adapter.

Latents are video clips (B, C, F, H, W): C = 16 channels of AutoencoderKLWan, F = (frames - 1) / 4 + 1 latent
frames (the VAE compresses time by 4, keeping the first frame alone), H, W = the picture's side / 8. Objectives are
shape-agnostic, so everything that works on image latents works on these. What differs from an image teacher, all
kept here:
  * the clip length: `set_num_frames` (data.num_frames) sets F; the pipeline's own call defaults (81 frames at
    480 x 832) are the full-size model's, so exports record `num_frames`, `height` and `width` with their recipe.
  * prompts are UMT5 states padded to 512 tokens, the positions past each prompt's length zeroed (WanPipeline's
    encode_prompt); the null prompt is "" (WanPipeline's default negative prompt is None, encoded as "").
  * the VAE's latents are normalized per channel with `latents_mean` / `latents_std` instead of one scaling
    factor; `decode` returns clips [B, 3, F, H, W] in [0, 1].
  * flow matching with Wan's shift: FlowMatchEulerDiscreteScheduler(shift) or UniPC's `flow_shift` (the hub
    folders' scheduler), both read by NoiseSchedule.from_scheduler_config; the velocity is eps - x0 at t = 1000 sigma.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from stepdistill.teachers.diffusers_teacher import DiffusersTeacher

DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH = 81, 480, 832  # WanPipeline.__call__'s defaults


class WanTeacher(DiffusersTeacher):
    """Wan text-to-video rectified flow on (B, 16, F, H/8, W/8) latents."""

    kind = "wan"
    backbone_name = "transformer"
    max_sequence_length = 512  # WanPipeline's default (and the length Wan was trained with)
    makes_video = True

    def vae_scale(self) -> int:
        return self.pipe.vae_scale_factor_spatial

    def _patch_size(self) -> int:
        return int(self.backbone.config.patch_size[-1])  # (time, height, width) patch

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1

    def _default_sample_shape(self) -> tuple[int, int, int, int]:
        scale = self.vae_scale()
        return (self.backbone.config.in_channels, self.latent_frames(DEFAULT_FRAMES), DEFAULT_HEIGHT // scale,
                DEFAULT_WIDTH // scale)

    @property
    def num_frames(self) -> int:
        """Frames of a decoded clip."""
        return (self.sample_shape[1] - 1) * self.pipe.vae_scale_factor_temporal + 1

    def set_num_frames(self, num_frames: int) -> None:
        step = self.pipe.vae_scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % step:
            fit = max(1, round((num_frames - 1) / step)) * step + 1
            raise ValueError(f"data.num_frames={num_frames}: Wan's VAE compresses time by {step} after the first "
                             f"frame, so clips have {step}k+1 frames: use e.g. data.num_frames={fit}")
        self.sample_shape = (self.sample_shape[0], self.latent_frames(num_frames), *self.sample_shape[2:])

    def pipeline_call_kwargs(self) -> dict:
        scale = self.vae_scale()
        return {"num_frames": self.num_frames, "height": self.sample_shape[2] * scale,
                "width": self.sample_shape[3] * scale, "max_sequence_length": self.max_sequence_length}

    # ------------------------------------------------------------------ conditioning
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipe.encode_prompt(prompts, None, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=self.device)
        return {"encoder_hidden_states": embeds}

    def fields_like(self, batch_size: int, device: torch.device | str) -> dict[str, Tensor]:
        width = self.backbone.config.text_dim
        return {"encoder_hidden_states": torch.randn(batch_size, self.max_sequence_length, width, device=device)}

    # ------------------------------------------------------------------ backbone calls
    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> Tensor:
        return net(hidden_states=x_t, timestep=t, encoder_hidden_states=fields["encoder_hidden_states"],
                   return_dict=False)[0]

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> clips [B, 3, F, H, W] in [0, 1]: the VAE's per-channel normalization undone, as WanPipeline."""
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=vae.device, dtype=vae.dtype).view(shape)
        std = torch.tensor(vae.config.latents_std, device=vae.device, dtype=vae.dtype).view(shape)
        z = latents.to(vae.device, vae.dtype) * std + mean
        return (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)


class WanI2VTeacher(WanTeacher):
    """Wan 2.1 image-to-video (WanImageToVideoPipeline): the first frame conditions every call, as 20 channels
    concatenated to the 16 of the noisy latents (a 4-channel mask, 1 on the first latent frame, and the VAE latents of
    the first frame followed by black frames) and, with an image encoder, CLIP's penultimate hidden states as extra
    tokens. Classifier-free guidance drops only the prompt: the image fields are the same in both branches."""

    kind = "wan_i2v"
    image_conditioned = True

    def _default_sample_shape(self) -> tuple[int, int, int, int]:
        channels = self.backbone.config.out_channels  # the input also holds the 20 condition channels
        return (channels, *super()._default_sample_shape()[1:])

    @torch.no_grad()
    def image_fields(self, images: Tensor) -> dict[str, Tensor]:
        """The first frames [B, 3, H, W] in [0, 1] as the pipeline conditions on them (`prepare_latents`,
        `encode_image`): through PIL, so a frame read from an image file is what the pipeline sees."""
        from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents

        from stepdistill.visualize import to_pil

        pipe, vae = self.pipe, self.pipe.vae
        frames = to_pil(images)
        _, f, h, w = self.sample_shape
        height, width = h * self.vae_scale(), w * self.vae_scale()
        pixels = pipe.video_processor.preprocess(frames, height=height, width=width).to(vae.device, torch.float32)
        video = torch.cat([pixels[:, :, None], pixels.new_zeros(len(frames), 3, self.num_frames - 1, height, width)], 2)
        latent = retrieve_latents(vae.encode(video.to(vae.dtype)), sample_mode="argmax").float()
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latent.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latent.device).view(shape)
        mask = torch.zeros(len(frames), 4, f, h, w, device=latent.device)
        mask[:, :, 0] = 1  # the first latent frame holds the given frame (4 mask channels: 4 pixel frames each)
        fields = {"condition": torch.cat([mask, (latent - mean) * (1.0 / std)], dim=1).to(self.device)}
        if pipe.image_encoder is not None:
            fields["encoder_hidden_states_image"] = pipe.encode_image(frames, self.device)
        return fields

    def fields_like(self, batch_size: int, device: torch.device | str) -> dict[str, Tensor]:
        fields = super().fields_like(batch_size, device)
        fields["condition"] = torch.randn(batch_size, 4 + self.pipe.vae.config.z_dim, *self.sample_shape[1:],
                                          device=device)
        if self.pipe.image_encoder is not None:  # CLIP's patch tokens and its class token
            vision = self.pipe.image_encoder.config
            tokens = (vision.image_size // vision.patch_size) ** 2 + 1
            fields["encoder_hidden_states_image"] = torch.randn(batch_size, tokens, vision.hidden_size, device=device)
        return fields

    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> Tensor:
        return net(hidden_states=torch.cat([x_t, fields["condition"]], dim=1), timestep=t,
                   encoder_hidden_states=fields["encoder_hidden_states"],
                   encoder_hidden_states_image=fields.get("encoder_hidden_states_image"), return_dict=False)[0]
