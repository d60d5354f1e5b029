"""Teachers at real scale with random weights: SD1.5 and SDXL pipelines built from their published architecture
configs (`assets/arch/*.json`), no download. Speed and memory do not depend on weight values."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from stepdistill.teachers.diffusers_teacher import DiffusersTeacher, SDTeacher, SDXLTeacher

ARCH_DIR = Path(__file__).resolve().parent.parent / "assets" / "arch"
MODELS = ("tiny-sd", "tiny-sdxl", "sd15", "sdxl")


def arch_config(model: str) -> dict:
    """The architecture JSON of `sd15` or `sdxl`."""
    return json.loads((ARCH_DIR / f"{model}.json").read_text())


def _text_encoder(spec: dict, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = dict(spec)
    cls = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}[spec.pop("class")]
    config = CLIPTextConfig(**spec, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return cls(config)


def build_real_pipeline(model: str):
    """A random-weight SD1.5 / SDXL pipeline on the current default device (use `with torch.device(...)`).
    The tokenizer is the byte-level one of the tiny pipelines: prompts are encoded once and cached, so its
    vocabulary does not change any measured number."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from stepdistill.teachers.tiny import _sd_scheduler, tiny_clip_tokenizer

    arch = arch_config(model)
    unet = UNet2DConditionModel.from_config(arch["unet"])
    vae = AutoencoderKL.from_config(arch["vae"])
    tokenizers = [tiny_clip_tokenizer() for _ in arch["text_encoders"]]
    encoders = [_text_encoder(s, t) for s, t in zip(arch["text_encoders"], tokenizers)]
    if model == "sd15":
        return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet,
                                       scheduler=_sd_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                     scheduler=_sd_scheduler(), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)


def build_teacher(model: str, device: torch.device | str, dtype: torch.dtype) -> DiffusersTeacher:
    """The SD / SDXL teacher of `model` (one of MODELS) on `device`, backbone and text encoders in `dtype`,
    VAE in fp32 (as `load_pipeline`). Real sizes are initialized directly on `device` (fast on a GPU)."""
    device = torch.device(device)
    if model.startswith("tiny-"):
        from stepdistill.teachers.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(model.removeprefix("tiny-"))
    elif model in ("sd15", "sdxl"):
        with torch.device(device):
            pipe = build_real_pipeline(model)
    else:
        raise ValueError(f"model {model!r} is not one of {MODELS}")
    pipe.to(device=device, dtype=dtype)
    pipe.vae.to(torch.float32)
    cls = SDXLTeacher if "sdxl" in model else SDTeacher
    return cls(pipe, identity=f"{model}:random", device=device)
