"""The accelerate boundary: building the Accelerator, preparing the objective's trainable modules, optimizers,
schedulers and data loader, and the only place that unwraps a prepared module. Prepared modules are set back into
the objective so that its forward calls run through DDP/FSDP; objectives only call them (what they need to
inspect, they record before preparation), so no objective ever unwraps.

Under FSDP2 (accelerate's FSDP plugin, `fsdp_version: 2`) each trainable module is sharded with its own optimizer,
one `accelerator.prepare(module, optimizer)` each (accelerate's FSDP2 path takes one model per call), and the
objective's frozen state modules (an EMA target) are sharded the same way so that they update shard by shard; the
frozen teacher stays replicated. Export and previews gather the generator's full state once, on the main
process, into a plain copy of the module (see `gathered`)."""
from __future__ import annotations

import copy
import os
import weakref
from pathlib import Path
from types import MethodType

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    FullyShardedDataParallelPlugin,
    ProjectConfiguration,
    convert_outputs_to_fp32,
    get_mixed_precision_context_manager,
)
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from stepdistill.config import ConfigError
from stepdistill.objectives.base import Objective, get_module, set_module

# a sharded module -> the same module with its parameters on the meta device (no storage), built before sharding:
# what a gathered full state is loaded into for export and previews
_SKELETONS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def resolve_mixed_precision(value: str) -> str:
    if value == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return value


def launched_processes() -> int:
    """How many processes the launcher started (torchrun's WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_requested() -> bool:
    """Whether `accelerate launch` was given an FSDP config (it exports ACCELERATE_USE_FSDP to every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(train_cfg, output_dir: Path, tracker: str | None) -> Accelerator:
    """The run's Accelerator; `tracker` is the resolved train.report_to (None: no tracker). Several processes on
    a machine without an accelerator device run on CPU with gloo (accelerate would otherwise start each one as a
    separate one-process run), and an FSDP launch there gets FSDP (see `_enable_fsdp_on_cpu`)."""
    cpu = launched_processes() > 1 and not torch.accelerator.is_available()
    acc = Accelerator(
        cpu=cpu,
        mixed_precision=resolve_mixed_precision(train_cfg.mixed_precision),
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if acc.num_processes != launched_processes():
        raise ConfigError(f"the launcher started {launched_processes()} processes but accelerate joined "
                          f"{acc.num_processes}: launch with `accelerate launch --num_processes N` (on a machine "
                          "without GPUs, add --cpu or set ACCELERATE_USE_CPU=true)")
    if fsdp_requested() and acc.distributed_type == DistributedType.MULTI_CPU:
        _enable_fsdp_on_cpu(acc)
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise ConfigError("FSDP version 1 is not supported: set fsdp_config.fsdp_version: 2 in the accelerate "
                          "config (configs/accelerate/fsdp.yaml)")
    return acc


def _enable_fsdp_on_cpu(acc: Accelerator) -> None:
    """accelerate 1.16 turns an FSDP launch into FSDP only on accelerator devices (state.py lists MULTI_GPU,
    MULTI_NPU, ... but not MULTI_CPU) although torch's `fully_shard` runs on CPU with gloo; set the state as
    accelerate's own FSDP branch does (distributed type in both shared states, the plugin read from the launch
    environment)."""
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # its precision policy: _prepare_sharded
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether this run shards its trainable modules (FSDP2)."""
    return accelerator.distributed_type == DistributedType.FSDP


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
    if is_sharded(accelerator):
        return _prepare_sharded(accelerator, objective, optimizers, schedulers, loader)
    paths = list(dict.fromkeys(g.module for g in objective.optimizer_groups()))
    names = list(optimizers)
    prepared = accelerator.prepare(*[get_module(objective, p) for p in paths], *[optimizers[n] for n in names],
                                   *[schedulers[n] for n in names], loader)
    for path, module in zip(paths, prepared[:len(paths)]):
        set_module(objective, path, module)
    k = len(paths)
    return (dict(zip(names, prepared[k:k + len(names)])), dict(zip(names, prepared[k + len(names):-1])),
            prepared[-1])


def _prepare_sharded(accelerator: Accelerator, objective: Objective, optimizers: dict, schedulers: dict, loader):
    """FSDP2: one `prepare(module, optimizer)` per trainable module (accelerate shards it in place and points the
    optimizer at the shards), then each frozen state module alone, then schedulers and loader. accelerate saves
    optimizer i with model i, so the trainable modules come first, in optimizer order. Every sharded module
    reshards after its forward, its root too (torch keeps a root's parameters whole after a forward that no
    backward follows, such as a generator's sample for a critic update or an EMA target's prediction), so the
    EMA, an EMA target's update and the memory between phases always see shards."""
    groups = objective.optimizer_groups()
    paths = [g.module for g in groups]
    shared = sorted({p for p in paths if paths.count(p) > 1})
    if shared:
        raise ConfigError(f"FSDP shards each module with one optimizer, but {', '.join(shared)} is trained by "
                          "several optimizer groups: launch this objective with configs/accelerate/ddp.yaml")
    if accelerator.mixed_precision != "no":
        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy()  # fp32 shards, autocast below
    prepared_optimizers = {}
    for g in groups:
        module = get_module(objective, g.module)
        _SKELETONS[module] = skeleton(module)
        module, prepared_optimizers[g.name] = accelerator.prepare(module, optimizers[g.name])
        _finish_sharded(accelerator, module)
        set_module(objective, g.module, module)
    for module in objective.checkpoint_modules():
        accelerator.prepare(module)  # in place: the objective's reference stays valid
        _finish_sharded(accelerator, module)
    names = list(schedulers)
    prepared = accelerator.prepare(*[schedulers[n] for n in names], loader)
    return prepared_optimizers, dict(zip(names, prepared[:-1])), prepared[-1]


def _finish_sharded(accelerator: Accelerator, module: nn.Module) -> None:
    """Reshard after every forward (see _prepare_sharded) and, with mixed precision, compute under autocast as
    accelerate's DDP path does: FSDP2's own policy would cast every parameter to bf16 for the whole forward, which
    the objectives' fp32 islands (autocast switched off for the DM conversions, the GAN head on fp32 features)
    cannot undo; the shards, their all-gathers and the gradient reduction stay fp32."""
    module.set_reshard_after_forward(True)
    if accelerator.mixed_precision != "no":
        autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
        module.forward = MethodType(convert_outputs_to_fp32(autocast(type(module).forward)), module)


def skeleton(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters are on the meta device (buffers are copied): no parameter storage."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def gathered(accelerator: Accelerator, module: nn.Module) -> nn.Module | None:
    """A sharded module's full state, gathered once (a collective: every process calls it) into a plain copy of
    the module on the main process (None on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    plain = copy.deepcopy(_SKELETONS[module])
    plain.load_state_dict(state, assign=True)
    return plain.to(accelerator.device)


def module_is_sharded(module: nn.Module) -> bool:
    return module in _SKELETONS


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of a DTensor, the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def clip_grad_norm(accelerator: Accelerator, parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients of `parameters` to a total norm of `max_norm` over all processes; returns the norm before
    clipping. Sharded gradients go to torch's DTensor-aware clip_grad_norm_ directly: accelerate 1.16 first matches
    the parameters against every prepared model with `list ==`, which compares tensors elementwise and fails when
    two sharded models (generator and critic) have as many parameters."""
    if not is_sharded(accelerator):
        return accelerator.clip_grad_norm_(parameters, max_norm)
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def unwrap(accelerator: Accelerator, module: nn.Module, keep_autocast: bool = True) -> nn.Module:
    """The raw module inside a prepared one (DDP, FSDP, compiled): export, EMA and previews use it. With
    `keep_autocast=False` the mixed-precision forward wrapper is removed from the module for good (after training),
    so inference runs in the module's own dtype, as the export does."""
    return accelerator.unwrap_model(module, keep_fp32_wrapper=keep_autocast)


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


def trainable_state_bytes(optimizers: dict) -> int:
    """Bytes this process holds for the trainable parameters and their optimizer states (its shards under FSDP):
    the per-process memory that sharding divides."""
    tensors = {}
    for opt in optimizers.values():
        opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
        for group in opt.param_groups:
            for p in group["params"]:
                tensors[id(p)] = local(p)
                tensors.update({id(v): local(v) for v in opt.state.get(p, {}).values() if torch.is_tensor(v)})
    return sum(t.numel() * t.element_size() for t in tensors.values())
