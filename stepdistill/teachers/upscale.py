"""Stable Diffusion's x4 upscaler (StableDiffusionUpscalePipeline) behind the Teacher adapter: a super-resolution
teacher conditioned on a low-resolution image as well as a prompt.

The UNet's input is the noisy latent (4 channels at the low-resolution image's size: the VAE downsamples by 4, the
output is 4x the input) concatenated with the low-resolution image itself (3 channels, in [-1, 1], noised by the
pipeline's `low_res_scheduler` to `noise_level`), and the noise level is its class label. Both are conditioning:
fields of `Cond` shared by the two guidance branches (the pipeline's CFG drops only the prompt), computed once per
condition from `data.image_dir` (the low-resolution images with their captions). The augmentation noise of a
condition is drawn once, from a generator seeded 0, where the pipeline draws it per call from its `generator`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from stepdistill.teachers.diffusers_teacher import SDTeacher

NOISE_LEVEL = 20  # StableDiffusionUpscalePipeline's default noise_level


class SDUpscaleTeacher(SDTeacher):
    """x4 upscaler: eps or v prediction (from its scheduler) of latents at the low-resolution image's size."""

    kind = "sd_upscale"
    image_conditioned = True
    noise_level = NOISE_LEVEL

    def _default_sample_shape(self) -> tuple[int, int, int]:
        side = self.backbone.config.sample_size
        return self.pipe.vae.config.latent_channels, side, side

    @property
    def condition_image_size(self) -> int:
        return self.sample_shape[-1]  # the low-resolution input is as large as the latent

    def pipeline_call_kwargs(self) -> dict:
        return {"noise_level": self.noise_level}

    @torch.no_grad()
    def image_fields(self, images: Tensor) -> dict[str, Tensor]:
        """Low-resolution images [B, 3, h, w] in [0, 1] as the pipeline feeds them: in [-1, 1], noised to
        `noise_level` by its low_res_scheduler, with the level as the UNet's class label."""
        pixels = images.to(self.device, torch.float32) * 2 - 1
        level = torch.full((len(pixels),), self.noise_level, dtype=torch.long, device=self.device)
        noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0)).to(self.device)
        return {"image": self.pipe.low_res_scheduler.add_noise(pixels, noise, level), "class_labels": level}

    def fields_like(self, batch_size: int, device: torch.device | str) -> dict[str, Tensor]:
        return {**super().fields_like(batch_size, device),
                "image": torch.randn(batch_size, 3, *self.sample_shape[1:], device=device),
                "class_labels": torch.full((batch_size,), self.noise_level, dtype=torch.long, device=device)}

    def _forward(self, net: nn.Module, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> Tensor:
        return net(torch.cat([x_t, fields["image"]], dim=1), t, encoder_hidden_states=fields["encoder_hidden_states"],
                   class_labels=fields["class_labels"], return_dict=False)[0]
