"""Tiny SD1.x, SDXL, PixArt, SD3-style, Flux and Wan diffusers pipelines built from small configs, fully offline.

They have the real architectures (UNet2DConditionModel, PixArtTransformer2DModel, SD3Transformer2DModel,
FluxTransformer2DModel, WanTransformer3DModel, AutoencoderKL(Wan), CLIP / T5 / UMT5 text encoders) with a handful of channels, 8x8 latents and tokenizers built locally,
so tests exercise the real code paths in seconds and `save_pretrained` / `from_pretrained` round-trip.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY_KINDS = ("sd", "sdxl", "pixart", "sd3", "flux")  # image pipelines
TINY_VIDEO_KINDS = ("wan", "wan_i2v")
TINY_SR_KINDS = ("sd_upscale",)
LATENT_SIZE = 8  # latents are 4 x 8 x 8; the tiny VAE downsamples by 2, so images are 16 x 16
CLIP_MAX_LENGTH = 77


def tiny_clip_tokenizer():
    """A byte-level CLIP tokenizer without merges: 256 byte symbols, their end-of-word forms and bos/eos."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def tiny_t5_tokenizer():
    """A T5 (unigram) tokenizer over lowercase letters and digits."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -1.0) for c in "▁abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _clip_text_model(tokenizer, hidden: int = 32, projection_dim: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=projection_dim or hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def _t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=37, d_kv=8, num_heads=4,
                                   num_layers=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _vae(**overrides):
    from diffusers import AutoencoderKL

    settings = dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=2 * LATENT_SIZE,
    )
    return AutoencoderKL(**{**settings, **overrides})


def _sd_scheduler():
    from diffusers import DDIMScheduler

    # SD1.x's training schedule (scaled_linear 0.00085..0.012, eps prediction)
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _unet(cross_attention_dim: int, **overrides):
    from diffusers import UNet2DConditionModel

    settings = dict(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )
    return UNet2DConditionModel(**{**settings, **overrides})


def build_tiny_pipeline(kind: str, seed: int = 0):
    """A randomly initialized tiny pipeline of `kind` (sd | sdxl | pixart | sd3 | flux | wan), deterministic in
    `seed`."""
    if kind not in _BUILDERS:
        raise ValueError(f"tiny pipeline kind {kind!r} is not one of {TINY_KINDS + TINY_VIDEO_KINDS + TINY_SR_KINDS}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _BUILDERS[kind]()


def _build_sd():
    from diffusers import StableDiffusionPipeline

    tokenizer = tiny_clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=_clip_text_model(tokenizer), tokenizer=tokenizer, unet=_unet(32),
        scheduler=_sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _build_sdxl():
    from diffusers import StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    text_encoder_2 = _clip_text_model(tokenizer_2, projection_dim=32)
    # SDXL's added conditioning: 6 time ids x addition_time_embed_dim + the pooled projection of encoder 2
    unet = _unet(64, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_clip_text_model(tokenizer), text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=_sd_scheduler(), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    tokenizer = tiny_t5_tokenizer()
    text_encoder = _t5_encoder(tokenizer, 32)
    # learned-sigma output (out_channels = 2 x in_channels) as the real PixArt-alpha
    transformer = PixArtTransformer2DModel(
        sample_size=LATENT_SIZE, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=24, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())


def _build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
    # joint_attention_dim >= the two CLIP hidden sizes concatenated (the pipeline zero-pads them to it);
    # pooled_projection_dim = the two CLIP projections concatenated; the T5 encoder's width = joint_attention_dim.
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip_text_model(tokenizer, projection_dim=32), tokenizer=tokenizer,
        text_encoder_2=_clip_text_model(tokenizer_2, projection_dim=32), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(tokenizer_3, 64), tokenizer_3=tokenizer_3,
    )


def _build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    # Flux.1-dev's structure: packed 2x2 latents (in_channels = 4 x the VAE's latent channels), double- and
    # single-stream blocks, rotary axes summing to the head dim, the guidance embedding; pooled = CLIP width,
    # joint_attention_dim = T5 width.
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )
    # FLUX.1-dev's scheduler config: the resolution-dependent shift
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        scheduler=scheduler, vae=_vae(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                                      use_post_quant_conv=False),
        text_encoder=_clip_text_model(tokenizer), tokenizer=tokenizer, text_encoder_2=_t5_encoder(tokenizer_2, 32),
        tokenizer_2=tokenizer_2, transformer=transformer,
    )


def _build_wan():
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    # diffusers' own Wan test configs: a 3-channel VAE base (8x in space, 4x in time after the first frame, 16
    # latent channels), a 2-layer transformer on (1, 2, 2) patches, text_dim = the UMT5 width
    tokenizer = tiny_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8, num_heads=4,
                                               num_layers=2, relative_attention_num_buckets=8, pad_token_id=0,
                                               eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)


def _build_wan_i2v():
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    t2v = _build_wan()
    # diffusers' own I2V test: 16 latent + 20 condition input channels, image tokens of a tiny CLIP vision tower
    transformer = WanTransformer3DModel(**{**t2v.transformer.config, "in_channels": 36, "image_dim": 4})
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=16, patch_size=1))
    return WanImageToVideoPipeline(
        tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae, scheduler=t2v.scheduler,
        transformer=transformer, image_encoder=image_encoder,
        image_processor=CLIPImageProcessor(crop_size=32, size=32))


def _build_sd_upscale():
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    # SD's x4 upscaler in miniature (diffusers' own upscaler test): the UNet takes 4 latent + 3 image channels and
    # the noise level as a class label; the VAE downsamples by 4, so latents are as large as the low-res input
    tokenizer = tiny_clip_tokenizer()
    unet = _unet(32, in_channels=7, num_class_embeds=100)
    vae = _vae(block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.08333, sample_size=4 * LATENT_SIZE)
    return StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=_clip_text_model(tokenizer), tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(), max_noise_level=350,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02,
                                prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False))


_BUILDERS = {"sd": _build_sd, "sdxl": _build_sdxl, "pixart": _build_pixart, "sd3": _build_sd3, "flux": _build_flux,
             "wan": _build_wan, "wan_i2v": _build_wan_i2v, "sd_upscale": _build_sd_upscale}


def save_tiny_pipeline(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny pipeline and `save_pretrained` it into `folder` (a diffusers pipeline folder)."""
    folder = Path(folder)
    build_tiny_pipeline(kind, seed).save_pretrained(str(folder))
    return folder
