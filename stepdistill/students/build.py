"""Student backbones: a copy of the teacher's, a smaller one of the same family, or a LoRA on a frozen copy,
optionally starting from saved weights (`student.init`)."""
from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from stepdistill.schedules import NoiseSchedule
from stepdistill.students.base import RenoiseGenerator
from stepdistill.students.lora import (
    adapter_layers,
    adapters_to_fp32,
    add_lora,
    is_diffusers_model,
    load_adapter_state_dict,
)
from stepdistill.teachers.base import Teacher

STUDENT_KINDS = ("copy", "smaller", "lora")
INIT_WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.safetensors",
                     "diffusion_pytorch_model.safetensors", "generator.safetensors")
# LoRA adapter files of an export: diffusers' save_lora_weights layout, and the MLP export's
INIT_LORA_FILES = ("lora/pytorch_lora_weights.safetensors", "lora.safetensors")


def build_backbone(teacher: Teacher, cfg) -> nn.Module:
    """The trainable backbone a StudentConfig describes (kind copy / smaller / lora, then `init`)."""
    if cfg.kind == "copy":
        backbone = teacher.build_backbone()
    elif cfg.kind == "smaller":
        backbone = build_smaller_backbone(teacher.build_backbone(), cfg.overrides, cfg.width)
    elif cfg.kind == "lora":  # the frozen base in the teacher's dtype (bf16 on a GPU), the adapters in fp32
        base = teacher.build_backbone(teacher.frozen_dtype)
        backbone = adapters_to_fp32(add_lora(base, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets))
    else:
        raise ValueError(f"student.kind {cfg.kind!r} is not one of {STUDENT_KINDS}")
    if cfg.init:
        if adapter_layers(backbone):
            load_init_adapter(backbone, cfg.init)
        else:
            load_init_weights(backbone, cfg.init)
    return backbone


def build_student(teacher: Teacher, cfg) -> RenoiseGenerator:
    """The default student of a StudentConfig: its backbone as a k-step re-noising generator at `cfg.timesteps`."""
    return RenoiseGenerator(build_backbone(teacher, cfg), teacher, cfg.timesteps, student_schedule(teacher, cfg),
                            cfg.prediction_type)


def student_schedule(teacher: Teacher, cfg) -> NoiseSchedule:
    """The student's own schedule: the teacher's, or a flow (rectified-flow students of any teacher, on the same
    time axis 0..T)."""
    if cfg.schedule == "teacher":
        return teacher.schedule
    return NoiseSchedule.flow(cfg.flow_shift, teacher.schedule.num_train_timesteps)


def _init_file(path: str, names: tuple[str, ...], what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"student.init: {p} does not exist (an exported student folder, a diffusers model "
                                f"folder or a {what} file)")
    if p.is_file():
        return p
    found = [p / name for name in names if (p / name).is_file()]
    if not found:
        raise FileNotFoundError(f"student.init: {p} holds none of {list(names)}: point it at an exported student "
                                f"folder (final/), a diffusers model folder or a {what} file")
    return found[0]


def load_init_weights(backbone: nn.Module, path: str) -> None:
    """Load student.init into `backbone`; every key must match (a different architecture is refused)."""
    from stepdistill.io import load_weights

    p = _init_file(path, INIT_WEIGHT_FILES, "weights")
    state = load_weights(p)
    expected = backbone.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(f"student.init: {p} does not fit the student's {type(backbone).__name__} "
                         f"({len(missing)} missing keys, {len(unexpected)} unexpected, {len(reshaped)} of another "
                         f"shape, e.g. {(missing + unexpected + reshaped)[:2]}): use weights of the same architecture")
    backbone.load_state_dict(state)


def load_init_adapter(backbone: nn.Module, path: str) -> None:
    """Start a LoRA student from an exported LoRA student's adapter (a previous stage of a recipe)."""
    from stepdistill.io import load_weights

    p = _init_file(path, INIT_LORA_FILES, "LoRA adapter")
    state = load_weights(p)
    prefix = next((k.split(".")[0] + "." for k in state if k.split(".")[0] in ("unet", "transformer")), "")
    state = {k[len(prefix):]: v for k, v in state.items()}
    try:
        load_adapter_state_dict(backbone, state)
    except ValueError as e:
        raise ValueError(f"student.init: {p}: {e}") from e


def build_smaller_backbone(template: nn.Module, overrides: dict, width: float = 1.0) -> nn.Module:
    """The template's architecture with its channel widths scaled by `width` and config overrides (fewer
    blocks/channels) on top, freshly initialized."""
    if not overrides and width == 1.0:
        raise ValueError("student.kind=smaller needs student.width < 1 or student.overrides, e.g. student.width=0.5 "
                         "or {block_out_channels: [32, 64]}")
    overrides = {**width_overrides(template, width), **overrides}
    if is_diffusers_model(template):
        unknown = sorted(set(overrides) - set(template.config))
        if unknown:
            raise ValueError(f"student.overrides has keys {unknown} that {type(template).__name__}'s config lacks")
        return type(template).from_config({**public_config(template), **overrides})
    from stepdistill.mlp import TimeCondMLP

    if isinstance(template, TimeCondMLP):
        allowed = {"hidden", "depth", "time_dim"}
        if set(overrides) - allowed:
            raise ValueError(f"student.overrides for the MLP backbone take {sorted(allowed)}, got {sorted(overrides)}")
        return TimeCondMLP(template.data_dim, template.num_classes, **overrides)
    raise ValueError(f"cannot build a smaller version of {type(template).__name__}")


def width_overrides(template: nn.Module, width: float) -> dict:
    """Config overrides that scale a backbone's channel widths by `width` (MSD's smaller students reduce channel
    width): a UNet's block_out_channels (its GroupNorm groups divide the new widths), the MLP's hidden size."""
    if width == 1.0:
        return {}
    from stepdistill.mlp import TimeCondMLP

    if isinstance(template, TimeCondMLP):
        return {"hidden": max(1, round(template.inp.out_features * width))}
    config = getattr(template, "config", {})
    if "block_out_channels" not in config:
        raise ValueError(f"student.width scales UNet and MLP backbones; for {type(template).__name__} set "
                         "student.overrides (e.g. fewer layers or attention heads)")
    heads = config.get("attention_head_dim")
    heads = math.lcm(*heads) if isinstance(heads, (list, tuple)) else heads or 1
    groups = config.get("norm_num_groups") or 32
    step = math.lcm(8, heads, groups)  # widths the attention heads and the GroupNorm groups divide
    channels = [round(c * width / step) * step for c in config["block_out_channels"]]
    if min(channels) == 0:  # narrower than the teacher's GroupNorm groups allow: fewer groups
        step = math.lcm(8, heads)
        channels = [max(step, round(c * width / step) * step) for c in config["block_out_channels"]]
        groups = math.gcd(groups, *channels)
    return {"block_out_channels": channels, "norm_num_groups": groups}


def public_config(model: nn.Module) -> dict:
    """A diffusers model's config without private keys: `_use_default_values` would make `from_config` ignore
    overrides of keys that were left at their defaults."""
    return {k: v for k, v in model.config.items() if not k.startswith("_")}
