"""Speed and memory options of a run: the optimizer class, learning-rate schedules, attention back-end,
channels_last, torch.compile, gradient checkpointing and the teacher's CPU offload."""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from stepdistill.config import ConfigError
from stepdistill.objectives.base import Objective, get_module
from stepdistill.teachers.base import Teacher


def optimizer_class(name: str) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer that train.optimizer names, called as AdamW(params, lr=, betas=, eps=, weight_decay=)."""
    if name == "adamw_8bit":
        try:
            from bitsandbytes.optim import AdamW8bit
        except ImportError as e:
            raise ConfigError("train.optimizer=adamw_8bit needs bitsandbytes, which is not installed: "
                              "pip install bitsandbytes, or set train.optimizer=adamw") from e
        return AdamW8bit
    if name == "adamw_fused":
        return functools.partial(torch.optim.AdamW, fused=True)
    if name == "adamw":
        return torch.optim.AdamW
    raise ConfigError(f"train.optimizer: {name!r} is not one of ['adamw', 'adamw_fused', 'adamw_8bit']")


def check_fused_adamw(device: torch.device) -> None:
    """Fail before training if torch has no fused AdamW kernel for `device` (torch checks only at the first step)."""
    probe = torch.zeros(1, device=device, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:
        torch.optim.AdamW([probe], fused=True).step()
    except RuntimeError as e:
        raise ConfigError(f"train.optimizer=adamw_fused: torch {torch.__version__} has no fused AdamW on "
                          f"{device.type} ({str(e).splitlines()[0]}); set train.optimizer=adamw") from e


def lr_scheduler(train_cfg, optimizer: torch.optim.Optimizer, processes: int):
    """diffusers' get_scheduler over the run's steps. accelerate steps a prepared scheduler once per process at
    each training step, so warm-up and length are counted in process-steps (as diffusers' training scripts do)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(train_cfg.lr_scheduler, optimizer, num_warmup_steps=train_cfg.lr_warmup_steps * processes,
                         num_training_steps=train_cfg.max_steps * processes)


def check_attention(name: str) -> None:
    """train.attention=xformers needs the xformers package; checked before the teacher loads."""
    if name != "xformers":
        return
    try:
        import xformers  # noqa: F401
    except ImportError as e:
        raise ConfigError("train.attention=xformers needs xformers, which is not installed: "
                          'pip install -e ".[xformers]", or set train.attention=sdpa (the default)') from e


def diffusers_models(modules: list[nn.Module]) -> list[nn.Module]:
    """The outermost diffusers models in `modules` (a DMD2 critic holds its UNet), once each: the modules that have
    `enable_xformers_memory_efficient_attention`, which itself recurses into nested ones (a UNet's transformers)."""
    from diffusers import ModelMixin

    found: dict[int, nn.Module] = {}
    stack = list(modules)
    while stack:
        module = stack.pop()
        if isinstance(module, ModelMixin):
            found[id(module)] = module
        else:
            stack.extend(module.children())
    return list(found.values())


def networks(objective: Objective) -> list[nn.Module]:
    """The networks a training step runs: each optimizer group's module and the teacher's backbone, once each."""
    modules = [get_module(objective, g.module) for g in objective.optimizer_groups()]
    if objective.teacher.backbone is not None:
        modules.append(objective.teacher.backbone)
    return list({id(m): m for m in modules}.values())


def enable_gradient_checkpointing(objective: Objective) -> None:
    """Gradient checkpointing in every trained diffusers model (the generator and, e.g., a critic's fake score)."""
    trained = [get_module(objective, g.module) for g in objective.optimizer_groups()]
    models = diffusers_models(trained)
    if not models:
        raise ConfigError(f"train.gradient_checkpointing: no trained network of this run supports it "
                          f"({', '.join(type(m).__name__ for m in trained)}); set train.gradient_checkpointing=false")
    for model in models:
        model.enable_gradient_checkpointing()


def apply_speed_options(objective: Objective, train_cfg, warn: Callable[[str], None]) -> None:
    """train.attention, train.channels_last and train.compile, before accelerate.prepare. `Module.compile()`
    compiles in place, so state-dict keys (checkpoints, EMA, export) stay those of the eager module (no
    `_orig_mod.` prefix). sdpa leaves diffusers' default processors (AttnProcessor2_0)."""
    if train_cfg.attention == "xformers":
        models = diffusers_models(networks(objective))
        if not models:
            warn("train.attention=xformers: no network of this run has diffusers attention; no change")
        for model in models:
            model.enable_xformers_memory_efficient_attention()
    for module in networks(objective):
        if train_cfg.channels_last:
            module.to(memory_format=torch.channels_last)  # 4-D (conv) weights only; others unchanged
        if train_cfg.compile:
            module.compile()


OFFLOAD_REFUSALS = {  # (config key, value) -> (why teacher.offload cannot work with it, the other fix)
    ("train.compile", True): ("the offload hooks swap weights in at every forward (torch.compile graph-breaks)",
                              "train.compile=false"),
    ("teacher.kind", "gmm"): ("the analytic teacher has no network weights to offload", None),
}


def teacher_offload_refusal(cfg) -> str | None:
    """Why teacher.offload=true cannot work with this config (the objective trains on the teacher's own backbone,
    or the run compiles it, or there is no network), or None; the trainer refuses with it and the planner skips
    its rung."""
    from stepdistill.objectives import objective_class

    if objective_class(cfg.objective.name).shares_teacher_backbone(cfg.objective):
        return (f"teacher.offload=true does not work with this {cfg.objective.name} config: a trained network uses "
                "the teacher's own backbone as its base, which must stay resident. Use a separate frozen teacher "
                "(see the objective's critic / teacher_net option) or set teacher.offload=false")
    sections = {"train": cfg.train, "teacher": cfg.teacher}
    for (key, value), (why, fix) in OFFLOAD_REFUSALS.items():
        section, name = key.split(".")
        if getattr(sections[section], name) == value:
            fixes = f"{fix} or teacher.offload=false" if fix else "teacher.offload=false"
            return f"teacher.offload=true does not work with {key}={str(value).lower()}: {why}. Set {fixes}"
    return None


def offload_teacher(teacher: Teacher, device: torch.device) -> nn.Module:
    """teacher.offload: the frozen backbone's weights move to CPU memory, and accelerate's cpu_offload hooks copy
    each submodule's weights to `device` for its own forward only (outputs return to the input's device)."""
    from accelerate import cpu_offload

    if teacher.backbone is None:
        raise ConfigError(f"teacher.offload=true: the {type(teacher).__name__} teacher has no network backbone to "
                          "offload; set teacher.offload=false")
    if any(p.requires_grad for p in teacher.backbone.parameters()):  # shared with a trained network
        raise ConfigError("teacher.offload=true: the teacher's backbone has trainable parameters (it is shared with a "
                          "trained network); set teacher.offload=false")
    return cpu_offload(teacher.backbone, execution_device=device)
