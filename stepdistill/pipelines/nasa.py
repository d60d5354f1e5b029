"""NASA, negative-away steer attention (SNOOPI, Nguyen et al., arXiv 2412.02687 §4): negative prompts for one-step
and few-step students, whose guidance-free sampling leaves diffusers' negative prompt inert. Training-free: in every
cross-attention layer the prompt's and the negative prompt's keys and values (the same W_q, W_k, W_v) give
Z+ = softmax(Q K+^T / sqrt(d)) V+ and Z- = softmax(Q K-^T / sqrt(d)) V-, and the layer continues with
Z+ - alpha Z- in place of its attention output, before the output projection.

`NASAAttnProcessor` is a diffusers attention processor; the pipelines below (SD1.x/2.x, SDXL, PixArt) take
`negative_prompt` and `nasa_scale` (alpha) and feed the backbone the prompt's tokens followed by the negative prompt's,
which the processor splits. They load any exported student of ours or anyone's distilled UNet / PixArt pipeline:

    pipe = nasa_pipeline(DiffusionPipeline.from_pretrained(folder))     # or NASAStableDiffusionPipeline.from_pretrained
    image = pipe("a cat", negative_prompt="blurry", nasa_scale=0.1, num_inference_steps=1, guidance_scale=0).images[0]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn

# SNOOPI's alpha (NASA-I): 0.1 for SD1.5 (0.2 for SD2.1), 0.5 for PixArt-alpha; SDXL has none published, so the
# UNet pipelines share SD1.5's
DEFAULT_NASA_SCALE = {"unet": 0.1, "transformer": 0.5}


@dataclass
class NASAState:
    """What the processors of one backbone read during a call: the number of prompt tokens at the front of the
    encoder states (0: NASA off) and alpha."""

    num_tokens: int = 0
    scale: float = 0.0


class NASAAttnProcessor:
    """Cross-attention with Z+ - alpha Z- when the encoder states carry a negative prompt after the prompt's
    `state.num_tokens` tokens; every other call (self-attention, NASA off) is diffusers' AttnProcessor2_0."""

    def __init__(self, state: NASAState) -> None:
        self.state = state
        self.default = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        n = self.state.num_tokens
        if encoder_hidden_states is None or not n or encoder_hidden_states.shape[1] <= n:
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            b, c, h, w = image_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        def heads(x: Tensor) -> Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(attn.to_q(hidden_states)), heads(attn.to_k(encoder_hidden_states)),
                             heads(attn.to_v(encoder_hidden_states)))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        mask_pos = mask_neg = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
            mask_pos, mask_neg = mask[..., :n], mask[..., n:]
        z_pos = F.scaled_dot_product_attention(query, key[:, :, :n], value[:, :, :n], attn_mask=mask_pos)
        z_neg = F.scaled_dot_product_attention(query, key[:, :, n:], value[:, :, n:], attn_mask=mask_neg)
        z = z_pos - self.state.scale * z_neg  # SNOOPI Eq. 8: Z_NASA = Z+ - alpha Z-, before the output projection
        hidden_states = z.transpose(1, 2).reshape(batch, -1, z.shape[1] * z.shape[3]).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if image_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def enable_nasa(backbone: nn.Module) -> NASAState:
    """Install NASA processors on every attention layer of a diffusers UNet or transformer (once; they act only
    while their state holds a token count) and return their shared state."""
    processors = list(backbone.attn_processors.values())
    if processors and all(isinstance(p, NASAAttnProcessor) for p in processors):
        return processors[0].state
    state = NASAState()
    backbone.set_attn_processor(NASAAttnProcessor(state))
    return state


class NASAPipelineMixin:
    """`negative_prompt` with `nasa_scale` (default: the model family's alpha) on a guidance-free call: the backbone
    sees [prompt tokens; negative tokens] and the processors subtract. nasa_scale=0 is the plain pipeline."""

    backbone_name: ClassVar[str] = "unet"

    def nasa_conditioning(self, prompt: list[str], negative: list[str]) -> tuple[dict, int]:
        """Pipeline kwargs with the prompt's and the negative prompt's embeddings joined along the tokens, and the
        number of prompt tokens."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, negative_prompt: str | list[str] | None = None,
                 nasa_scale: float | None = None, **kwargs):
        scale = DEFAULT_NASA_SCALE[self.backbone_name] if nasa_scale is None else nasa_scale
        if negative_prompt is None or scale == 0:
            return super().__call__(prompt=prompt, negative_prompt=negative_prompt, **kwargs)
        if kwargs.setdefault("guidance_scale", 0.0) > 1:
            raise ValueError(f"NASA (nasa_scale={scale}) applies the negative prompt in attention, for guidance-free "
                             f"sampling: pass guidance_scale <= 1 (got {kwargs['guidance_scale']}), or nasa_scale=0 "
                             "for diffusers' classifier-free guidance with the negative prompt")
        if prompt is None:
            raise ValueError("NASA needs the prompt as text (prompt=...), not prompt_embeds")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        conditioning, num_tokens = self.nasa_conditioning(prompts, negatives)
        state = enable_nasa(getattr(self, self.backbone_name))
        state.num_tokens, state.scale = num_tokens, float(scale)
        try:
            return super().__call__(**conditioning, **kwargs)
        finally:
            state.num_tokens, state.scale = 0, 0.0


class NASAStableDiffusionPipeline(NASAPipelineMixin, StableDiffusionPipeline):
    def nasa_conditioning(self, prompt, negative):
        pos, _ = self.encode_prompt(prompt, self._execution_device, 1, False)
        neg, _ = self.encode_prompt(negative, self._execution_device, 1, False)
        return {"prompt_embeds": torch.cat([pos, neg], dim=1)}, pos.shape[1]


class NASAStableDiffusionXLPipeline(NASAPipelineMixin, StableDiffusionXLPipeline):
    def nasa_conditioning(self, prompt, negative):
        device = self._execution_device
        pos, _, pooled, _ = self.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)
        neg, _, _, _ = self.encode_prompt(negative, device=device, do_classifier_free_guidance=False)
        return {"prompt_embeds": torch.cat([pos, neg], dim=1), "pooled_prompt_embeds": pooled}, pos.shape[1]


class NASAPixArtAlphaPipeline(NASAPipelineMixin, PixArtAlphaPipeline):
    backbone_name = "transformer"

    def nasa_conditioning(self, prompt, negative):
        device = self._execution_device
        pos, pos_mask, _, _ = self.encode_prompt(prompt, do_classifier_free_guidance=False, device=device,
                                                 clean_caption=False)
        neg, neg_mask, _, _ = self.encode_prompt(negative, do_classifier_free_guidance=False, device=device,
                                                 clean_caption=False)
        return {"prompt_embeds": torch.cat([pos, neg], dim=1),
                "prompt_attention_mask": torch.cat([pos_mask, neg_mask], dim=1)}, pos.shape[1]


NASA_PIPELINES = {StableDiffusionPipeline: NASAStableDiffusionPipeline,
                  StableDiffusionXLPipeline: NASAStableDiffusionXLPipeline,
                  PixArtAlphaPipeline: NASAPixArtAlphaPipeline}


def nasa_pipeline(pipe):
    """The NASA version of a loaded SD1.x/2.x, SDXL or PixArt-alpha pipeline, sharing its components."""
    for base, nasa in NASA_PIPELINES.items():
        if isinstance(pipe, nasa):
            return pipe
        if type(pipe) is base:
            return nasa.from_pipe(pipe)
    raise ValueError(f"NASA has no pipeline for {type(pipe).__name__}: it supports "
                     f"{', '.join(base.__name__ for base in NASA_PIPELINES)} (MMDiT/SD3 joint attention is not "
                     "covered)")
