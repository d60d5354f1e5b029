"""Teachers at real scale with random weights: SD1.5, SD2.1 (768-v and 512-base), SDXL, PixArt-alpha (1024 and 512),
SD3-medium, Flux.1, Wan 2.1 T2V-1.3B and I2V-14B pipelines built from their published architecture configs (`assets/arch/*.json`, each naming
the hub files it copies and the hub ids it describes), no download. Speed and memory do not depend on weight values.

Build on `torch.device("meta")` for shapes and bytes without memory (the planner). At real size on CPU the text
encoders are the trouble: T5-XXL alone is 4.7B parameters (19 GB in fp32). `text_encoders="reduced"` builds each
text encoder with its real output widths (hidden size / d_model, projection and pooled dims) but one layer, a
narrow attention and MLP and the tiny tokenizer's vocabulary: prompts are encoded once and cached, so the
conditioning has the real shapes while the backbone and VAE are the real networks.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from stepdistill.teachers.diffusers_teacher import DiffusersTeacher
from stepdistill.teachers.loading import detect_kind, teacher_class
from stepdistill.teachers.tiny import TINY_KINDS, TINY_VIDEO_KINDS

ARCH_DIR = Path(__file__).resolve().parent.parent / "assets" / "arch"
REAL_MODELS = ("sd15", "sd21", "sd21-base", "sdxl", "pixart", "pixart-512", "sd3", "flux", "flux-schnell",
               "wan21-t2v-1.3b", "wan21-i2v-14b-480p")
KIND_DEFAULT = {"sd": "sd15", "sdxl": "sdxl", "pixart": "pixart", "sd3": "sd3", "flux": "flux",  # teacher.kind
                "wan": "wan21-t2v-1.3b", "wan_i2v": "wan21-i2v-14b-480p"}
MODELS = tuple(f"tiny-{k}" for k in TINY_KINDS + TINY_VIDEO_KINDS) + REAL_MODELS
TEXT_ENCODERS = ("full", "reduced")


def arch_config(model: str) -> dict:
    """The architecture JSON of a real model (one of REAL_MODELS)."""
    if model not in REAL_MODELS:
        raise ValueError(f"model {model!r} has no architecture asset: use one of {REAL_MODELS}")
    return json.loads((ARCH_DIR / f"{model}.json").read_text())


def model_for(kind: str, path: str = "") -> str | None:
    """The real architecture of a teacher config: the asset whose `hub_ids` hold teacher.path (the hub id, or a
    local folder named like its repo), else the default of teacher.kind; None for kinds without one (gmm, mlp)."""
    name = path.rstrip("/").lower()
    for model in REAL_MODELS:
        ids = [i.lower() for i in arch_config(model)["hub_ids"]]
        if name and any(name == i or name.endswith("/" + i.split("/")[-1]) for i in ids):
            return model
    return KIND_DEFAULT.get(kind)


def _tokenizer(kind: str):
    from stepdistill.teachers.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    return {"clip": tiny_clip_tokenizer, "t5": tiny_t5_tokenizer}[kind]()


def _text_encoder(spec: dict, tokenizer, reduced: bool):
    """A CLIP, T5 or UMT5 text encoder of `spec` (a published config); `reduced` keeps the output widths only."""
    import transformers

    spec = dict(spec)
    cls = getattr(transformers, spec.pop("_class_name"))
    if cls in (transformers.T5EncoderModel, transformers.UMT5EncoderModel):
        if reduced:
            spec.update(num_layers=1, d_ff=64, d_kv=8, num_heads=8, vocab_size=len(tokenizer))
        config = transformers.UMT5Config if cls is transformers.UMT5EncoderModel else transformers.T5Config
        return cls(config(**spec, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    if reduced:
        spec.update(num_hidden_layers=1, intermediate_size=64, vocab_size=len(tokenizer))
    return cls(transformers.CLIPTextConfig(**spec, bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def build_real_pipeline(model: str, text_encoders: str = "full"):
    """A random-weight pipeline of `model` (one of REAL_MODELS) on the current default device (use `with
    torch.device(...)`). Tokenizers are the tiny pipelines' offline ones: prompts are encoded once and cached, so
    their vocabulary changes no measured number. `text_encoders="reduced"`: see the module docstring."""
    import diffusers

    if text_encoders not in TEXT_ENCODERS:
        raise ValueError(f"text_encoders={text_encoders!r} is not one of {TEXT_ENCODERS}")
    arch = arch_config(model)
    specs = arch["components"]
    components: dict = {name: _tokenizer(spec) for name, spec in specs.items() if name.startswith("tokenizer")}
    for name, spec in specs.items():
        if name.startswith("text_encoder"):
            tokenizer = components["tokenizer" + name.removeprefix("text_encoder")]
            components[name] = _text_encoder(spec, tokenizer, text_encoders == "reduced")
        elif name == "image_encoder":  # a CLIP vision tower (image-to-video), at its real size
            import transformers

            spec = dict(spec)
            cls = getattr(transformers, spec.pop("_class_name"))
            components[name] = cls(transformers.CLIPVisionConfig(**spec))
        elif name == "image_processor":
            import transformers

            spec = dict(spec)
            components[name] = getattr(transformers, spec.pop("_class_name"))(**spec)
        elif name == "scheduler":  # its tables stay on the CPU, as diffusers keeps them
            with torch.device("cpu"):
                components[name] = getattr(diffusers, spec["_class_name"]).from_config(spec)
        elif not name.startswith("tokenizer"):
            components[name] = getattr(diffusers, spec["_class_name"]).from_config(spec)
    return getattr(diffusers, arch["pipeline"])(**components, **arch["pipeline_args"])


def build_teacher(model: str, device: torch.device | str, dtype: torch.dtype,
                  text_encoders: str = "full") -> DiffusersTeacher:
    """The teacher of `model` (one of MODELS) on `device`, backbone and text encoders in `dtype`, VAE in fp32 (as
    `load_pipeline`). Real sizes are initialized directly on `device` (fast on a GPU, free on meta)."""
    device = torch.device(device)
    if model.startswith("tiny-") and model.removeprefix("tiny-") in TINY_KINDS + TINY_VIDEO_KINDS:
        from stepdistill.teachers.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(model.removeprefix("tiny-"))
    elif model in REAL_MODELS:
        with torch.device(device):
            pipe = build_real_pipeline(model, text_encoders)
    else:
        raise ValueError(f"model {model!r} is not one of {MODELS}")
    pipe.to(device=device, dtype=dtype)
    pipe.vae.to(torch.float32)
    return teacher_class(detect_kind(pipe))(pipe, identity=f"{model}:random", device=device)
