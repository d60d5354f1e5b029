"""The accelerate boundary: building the Accelerator, preparing the objective's trainable modules, optimizers,
schedulers and data loader, and the only place that unwraps a prepared module. Prepared modules are set back into
the objective so that its forward calls run through DDP/FSDP; objectives only call them (what they need to
inspect, they record before preparation), so no objective ever unwraps."""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration
from torch import nn

from stepdistill.config import ConfigError
from stepdistill.objectives.base import Objective, get_module, set_module


def resolve_mixed_precision(value: str) -> str:
    if value == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return value


def make_accelerator(train_cfg, output_dir: Path, tracker: str | None) -> Accelerator:
    """The run's Accelerator; `tracker` is the resolved train.report_to (None: no tracker)."""
    return Accelerator(
        mixed_precision=resolve_mixed_precision(train_cfg.mixed_precision),
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def check_distributed(distributed_type: DistributedType, groups: list[str]) -> None:
    """accelerate's DeepSpeed integration prepares one model/optimizer pair per engine (several need several
    DeepSpeed plugins): refuse objectives with more than one optimizer group before accelerate.prepare."""
    if distributed_type == DistributedType.DEEPSPEED and len(groups) > 1:
        raise ConfigError(f"DeepSpeed (accelerate distributed_type DEEPSPEED) prepares one model and optimizer, but "
                          f"this objective trains {len(groups)} optimizer groups ({', '.join(groups)}): launch with "
                          "configs/accelerate/fsdp.yaml instead (FSDP shards every group)")


def prepare(accelerator: Accelerator, objective: Objective, optimizers: dict, schedulers: dict, loader):
    """accelerate.prepare every optimizer group's module (once each), the optimizers, the schedulers and the loader;
    the prepared modules replace the raw ones inside the objective. Returns (optimizers, schedulers, loader)."""
    paths = list(dict.fromkeys(g.module for g in objective.optimizer_groups()))
    names = list(optimizers)
    prepared = accelerator.prepare(*[get_module(objective, p) for p in paths], *[optimizers[n] for n in names],
                                   *[schedulers[n] for n in names], loader)
    for path, module in zip(paths, prepared[:len(paths)]):
        set_module(objective, path, module)
    k = len(paths)
    return (dict(zip(names, prepared[k:k + len(names)])), dict(zip(names, prepared[k + len(names):-1])),
            prepared[-1])


def unwrap(accelerator: Accelerator, module: nn.Module) -> nn.Module:
    """The raw module inside a prepared one (DDP, FSDP, compiled): export, EMA and previews use it."""
    return accelerator.unwrap_model(module)


def all_ranks(accelerator: Accelerator, flag: bool, reduce: str) -> bool:
    """`flag` combined over processes ("all" or "any"), so every rank takes the same branch."""
    if accelerator.num_processes == 1:
        return flag
    flags = accelerator.gather(torch.tensor([float(flag)], device=accelerator.device))
    return bool(flags.min() > 0) if reduce == "all" else bool(flags.max() > 0)


def close_process_group() -> None:
    """End the distributed process group at the end of a command (after every stage of a recipe)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
