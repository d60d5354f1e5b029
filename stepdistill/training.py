"""The trainer on accelerate. It owns optimizers, the objective's phase schedule, mixed precision, clipping,
EMA, checkpoints, logs and validation pictures, and knows nothing of any objective's math."""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stepdistill.config import (
    Config,
    ConfigError,
    check_teacher_source,
    config_to_dict,
    teacher_offload_refusal,
)
from stepdistill.data import ConditionSource, ImageFolderDataset, read_prompts
from stepdistill.objectives import REGISTRY, Objective
from stepdistill.objectives.base import get_module, set_module
from stepdistill.safeload import refuse_pickle
from stepdistill.students import build_student
from stepdistill.teachers import Teacher, load_teacher

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-" + CHECKPOINT_PREFIX
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
OBJECTIVE_STATE = "objective_module_{}.safetensors"  # modules an objective keeps outside its optimizers
TEST_PAUSE_ENV = "STEPDISTILL_TEST_PAUSE"  # test-only, see Trainer._test_pause


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight was NaN/inf and training cannot go on as configured."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    final_dir: Path | None
    skipped_steps: int
    interrupted: int = 0  # the signal (SIGINT/SIGTERM) that stopped the run after a checkpoint; 0: it finished


def resolve_mixed_precision(value: str) -> str:
    if value == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return value


def lr_factor(kind: str, warmup: int, total: int, processes: int) -> Callable[[int], float]:
    """LR multiplier as a function of the scheduler's count. accelerate steps a prepared scheduler once per process
    at each training step, so the count is divided back into training steps (the schedule is the same whatever
    the number of processes). The shapes are diffusers' get_scheduler ones (cosine: half a period)."""

    def factor(count: int) -> float:
        step = count // processes
        if kind != "constant" and step < warmup:
            return step / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def save_ema(ema: "EMAModel", path: Path) -> None:
    """diffusers' EMAModel state as safetensors (its own state_dict would be pickled by accelerate)."""
    save_file({f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}, str(path),
              metadata={"optimization_step": str(ema.optimization_step)})


def load_ema(ema: "EMAModel", path: Path) -> None:
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"{path.parent} holds no EMA state ({EMA_FILE}): it was written with train.ema_decay=0; "
                         "resume with that setting or start a new run")
    tensors = load_file(str(path))
    if len(tensors) != len(ema.shadow_params):
        raise ValueError(f"{path} holds {len(tensors)} EMA tensors, this model has {len(ema.shadow_params)}")
    with torch.no_grad():
        for i, p in enumerate(ema.shadow_params):
            p.copy_(tensors[f"shadow.{i}"])
    with safe_open(str(path), "pt") as f:
        ema.optimization_step = int(f.metadata()["optimization_step"])


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts once it was renamed into place with its state file)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders whose write was interrupted (temporary folders, or no state file)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and (p.name.startswith(TMP_PREFIX) or not (p / STATE_FILE).is_file()))


def find_resume_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint `train.resume` names: a folder, or with "latest" the newest complete one (None if none)."""
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"train.resume: {path} is not a complete checkpoint (no {STATE_FILE}); "
                                    "use train.resume=latest or a checkpoint-N folder")
        return path
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    found: dict[int, nn.Module] = {}
    stack = list(modules)
    while stack:
        module = stack.pop()
        if hasattr(module, "enable_xformers_memory_efficient_attention"):
            found[id(module)] = module
        else:
            stack.extend(module.children())
    return list(found.values())


def offload_teacher(teacher: Teacher, device: torch.device) -> nn.Module:
    """teacher.offload: the frozen backbone's weights move to CPU memory, and accelerate's cpu_offload hooks copy
    each submodule's weights to `device` for its own forward only (outputs return to the input's device)."""
    from accelerate import cpu_offload

    backbone = getattr(teacher, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ConfigError(f"teacher.offload=true: the {type(teacher).__name__} teacher has no network backbone to "
                          "offload; set teacher.offload=false")
    if any(p.requires_grad for p in backbone.parameters()):  # shared with a trained network: must stay resident
        raise ConfigError("teacher.offload=true: the teacher's backbone has trainable parameters (it is shared with a "
                          "trained network); set teacher.offload=false")
    return cpu_offload(backbone, execution_device=device)


def check_distributed(distributed_type: DistributedType, groups: list[str]) -> None:
    """accelerate's DeepSpeed integration prepares one model/optimizer pair per engine (several need several
    DeepSpeed plugins): refuse objectives with more than one optimizer group before accelerate.prepare."""
    if distributed_type == DistributedType.DEEPSPEED and len(groups) > 1:
        raise ConfigError(f"DeepSpeed (accelerate distributed_type DEEPSPEED) prepares one model and optimizer, but "
                          f"this objective trains {len(groups)} optimizer groups ({', '.join(groups)}): launch with "
                          "configs/accelerate/fsdp.yaml instead (FSDP shards every group)")


def build_objective(cfg: Config, device: torch.device | str) -> Objective:
    """Teacher, conditions, student and objective as the config describes them (prompts read before the
    teacher loads, so a bad prompt file fails fast)."""
    prompts = read_prompts(cfg.data.prompts_file) if cfg.data.prompts_file else None
    teacher = load_teacher(cfg.teacher, device)
    if prompts is None and getattr(teacher, "needs_prompts", False):
        from stepdistill.data import DEFAULT_PROMPTS

        prompts = DEFAULT_PROMPTS
    source = ConditionSource(teacher, prompts)
    generator = build_student(teacher, cfg.student)
    return REGISTRY[cfg.objective.name](teacher, generator, source, cfg.objective)


class Trainer:
    def __init__(self, cfg: Config, objective: Objective | None = None) -> None:
        self.cfg = cfg
        t = cfg.train
        if t.device_threads:
            torch.set_num_threads(t.device_threads)
        self.output_dir = Path(t.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(t.mixed_precision),
            log_with=None if t.report_to == "none" else t.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        set_seed(t.seed)
        self._check_output_dir()
        self._check_inputs()
        self.optimizer_class = optimizer_class(t.optimizer)  # a missing bitsandbytes fails before the teacher loads
        acc = self.accelerator
        self.objective = objective or build_objective(cfg, acc.device)
        self._check_compatible()
        check_distributed(acc.distributed_type, [g.name for g in self.objective.optimizer_groups()])
        self.objective.to(acc.device)  # the teacher is no submodule: its backbone stays where it was loaded
        with acc.main_process_first():
            self.objective.prepare_data(str(self.output_dir), acc.device)
        if t.gradient_checkpointing:
            backbone = self.objective.generator.backbone
            if not hasattr(backbone, "enable_gradient_checkpointing"):
                raise ValueError(f"train.gradient_checkpointing: {type(backbone).__name__} does not support it")
            backbone.enable_gradient_checkpointing()
        self._apply_speed_options()
        self._offload_teacher()  # after pair caching, which runs the teacher resident (no trainer state exists yet)
        self._build_optimizers()
        self.ema = None
        if t.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self._ema_parameters(), decay=t.ema_decay)
        self.step = 0
        self.skipped_steps = 0
        self._signal = 0

    # ------------------------------------------------------------------ setup
    def _warn(self, message: str, *args: object) -> None:
        """A warning from the main process only."""
        if self.accelerator.is_main_process:
            logger.warning(message, *args)

    def _check_output_dir(self) -> None:
        """Refuse an output folder that holds a different run unless resuming or overwriting is asked for."""
        t = self.cfg.train
        saved = self.output_dir / "config.json"
        if not saved.is_file() or t.overwrite:
            return
        previous = json.loads(saved.read_text())
        current = json.loads(json.dumps(config_to_dict(self.cfg), default=str))
        strip = ("train",)
        if t.resume and {k: v for k, v in previous.items() if k not in strip} == \
                {k: v for k, v in current.items() if k not in strip}:
            return
        if t.resume:
            raise ValueError(f"train.output_dir {self.output_dir} holds a run with a different config: resume it with "
                             "its own config, or choose another output_dir")
        raise ValueError(f"train.output_dir {self.output_dir} already holds a run: set train.resume=latest to "
                         "continue it, train.overwrite=true to replace it, or choose another output_dir")

    def _check_inputs(self) -> None:
        """Checks that need no model, run before the teacher loads: its source, the prompt file, the images."""
        check_teacher_source(self.cfg.teacher)
        check_attention(self.cfg.train.attention)
        if self.cfg.teacher.offload and (refusal := teacher_offload_refusal(self.cfg)):
            raise ConfigError(refusal)
        data = self.cfg.data
        if data.prompts_file:
            read_prompts(data.prompts_file)
        self.real_images = None  # checked real images, for objectives with a real-image branch
        if data.image_dir:
            self.real_images = ImageFolderDataset(data.image_dir, data.resolution, data.bad_images)
            if self.real_images.num_skipped:
                self._warn("data.image_dir: skipped %d bad files (%s); training on %d images",
                           self.real_images.num_skipped,
                           ", ".join(f"{len(v)} {k}" for k, v in self.real_images.skipped.items()),
                           len(self.real_images))

    def _check_compatible(self) -> None:
        """Teacher, student and objective fit together (before pair generation or any training)."""
        teacher, generator = self.objective.teacher, self.objective.generator
        kind, prediction = teacher.schedule.kind, generator.prediction_type
        if (prediction == "flow" and kind != "flow") or (prediction == "v_prediction" and kind == "flow"):
            raise ValueError(f"student.prediction_type={prediction} does not fit the teacher's {kind} schedule: unset "
                             f"student.prediction_type (the teacher's own: {teacher.schedule.prediction_type}) or "
                             "use a teacher with a matching schedule")
        resolution = self.cfg.data.resolution
        if resolution:
            multiple = getattr(teacher, "resolution_multiple", None)
            if multiple is None:
                raise ValueError(f"data.resolution={resolution}: the {type(teacher).__name__} teacher does not make "
                                 "images; set data.resolution=0")
            if resolution % multiple:
                fit = max(multiple, round(resolution / multiple) * multiple)
                raise ValueError(f"data.resolution={resolution} is not a multiple of {multiple}, which the teacher's "
                                 f"VAE and backbone need: use e.g. data.resolution={fit}")
        self.objective.check_compatible()

    def networks(self) -> list[nn.Module]:
        """The networks a training step runs: each optimizer group's module and the teacher's backbone, once each."""
        modules = [get_module(self.objective, g.module) for g in self.objective.optimizer_groups()]
        teacher = getattr(self.objective.teacher, "backbone", None)  # the analytic GMM teacher has none
        if isinstance(teacher, nn.Module):
            modules.append(teacher)
        return list({id(m): m for m in modules}.values())

    def _apply_speed_options(self) -> None:
        """train.attention, train.channels_last and train.compile, before accelerate.prepare. `Module.compile()`
        compiles in place, so state-dict keys (checkpoints, EMA, export) stay those of the eager module (no
        `_orig_mod.` prefix). sdpa leaves diffusers' default processors (AttnProcessor2_0)."""
        t = self.cfg.train
        if t.attention == "xformers":
            models = diffusers_models(self.networks())
            if not models:
                self._warn("train.attention=xformers: no network of this run has diffusers attention; no change")
            for model in models:
                model.enable_xformers_memory_efficient_attention()
        for module in self.networks():
            if t.channels_last:
                module.to(memory_format=torch.channels_last)  # 4-D (conv) weights only; others unchanged
            if t.compile:
                module.compile()

    def _offload_teacher(self) -> None:
        """teacher.offload on an accelerator; on a CPU run the weights already are in CPU memory."""
        if not self.cfg.teacher.offload:
            return
        if self.accelerator.device.type == "cpu":
            self._warn("teacher.offload=true has no effect on a CPU run: the teacher's weights are in CPU memory")
            return
        offload_teacher(self.objective.teacher, self.accelerator.device)

    def _ema_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.objective.generator.backbone.parameters() if p.requires_grad]

    def _build_optimizers(self) -> None:
        acc, t = self.accelerator, self.cfg.train
        self.groups = {g.name: g for g in self.objective.optimizer_groups()}
        self.optimizers, self.schedulers = {}, {}
        module_paths: list[str] = []
        for g in self.groups.values():
            params = [p for p in get_module(self.objective, g.module).parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"optimizer group {g.name!r}: module {g.module} has no trainable parameters")
            if t.optimizer == "adamw_fused":
                check_fused_adamw(params[0].device)
            self.optimizers[g.name] = self.optimizer_class(params, lr=g.lr, betas=g.betas, eps=g.eps,
                                                           weight_decay=g.weight_decay)
            self.schedulers[g.name] = torch.optim.lr_scheduler.LambdaLR(
                self.optimizers[g.name],
                lr_factor(t.lr_scheduler, t.lr_warmup_steps, t.max_steps, acc.num_processes))
            if g.module not in module_paths:
                module_paths.append(g.module)
        modules = [get_module(self.objective, p) for p in module_paths]
        names = list(self.optimizers)
        loader = DataLoader(self.objective.dataset(), batch_size=t.batch_size, shuffle=True, drop_last=True,
                            num_workers=self.cfg.data.num_workers)
        prepared = acc.prepare(*modules, *[self.optimizers[n] for n in names],
                               *[self.schedulers[n] for n in names], loader)
        for path, module in zip(module_paths, prepared[:len(modules)]):
            set_module(self.objective, path, module)
        k = len(modules)
        self.optimizers = dict(zip(names, prepared[k:k + len(names)]))
        self.schedulers = dict(zip(names, prepared[k + len(names):k + 2 * len(names)]))
        self.loader = prepared[-1]
        if len(self.loader) == 0:
            raise ValueError(f"train.batch_size {t.batch_size} x {acc.num_processes} processes is larger than the "
                             f"dataset ({len(self.objective.dataset())} items): lower train.batch_size")

    # ------------------------------------------------------------------ checkpoints
    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        paths = dict.fromkeys(g.module for g in self.groups.values())
        return [(f"{path}.{n}", p) for path in paths
                for n, p in get_module(self.objective, path).named_parameters() if p.requires_grad]

    def _check_weights_finite(self) -> None:
        bad = [name for name, p in self._trainable() if not torch.isfinite(p).all()]
        if self.ema is not None and not all(torch.isfinite(s).all() for s in self.ema.shadow_params):
            bad.append("EMA")
        if bad:
            last = list_checkpoints(self.output_dir)
            raise NonFiniteError(f"step {self.step}: non-finite weights in {', '.join(bad[:3])}; no checkpoint was "
                                 "written. Resume from the last complete checkpoint "
                                 f"({last[-1] if last else 'none'}) with a lower learning rate")

    def save_checkpoint(self) -> Path:
        """accelerate save_state into a temporary folder, then an atomic rename; prune old checkpoints.

        Weights are checked first: a checkpoint never holds NaN/inf. A crash at any moment leaves at most a
        temporary folder, which `resume: latest` skips and the next save removes."""
        acc = self.accelerator
        self._check_weights_finite()
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.step}"
        tmp = root / f"{TMP_PREFIX}{self.step}"
        if acc.is_main_process:
            for stale in incomplete_checkpoints(self.output_dir):
                shutil.rmtree(stale, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.ema is not None:
                save_ema(self.ema, tmp / EMA_FILE)
            for i, module in enumerate(self.objective.checkpoint_modules()):
                save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                          str(tmp / OBJECTIVE_STATE.format(i)))
            (tmp / STATE_FILE).write_text(json.dumps({"step": self.step, "skipped_steps": self.skipped_steps}))
            self._test_pause("save")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in list_checkpoints(self.output_dir)[:-self.cfg.train.checkpoints_limit]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything save_checkpoint wrote; pickles are loaded tensors-only (weights_only)."""
        try:
            self.accelerator.load_state(str(path))
        except pickle.UnpicklingError as e:
            raise refuse_pickle(path, e) from e
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"train.resume: {path} does not fit this run's model or optimizers "
                             f"({str(e).splitlines()[0]}); resume with the config that wrote it") from e
        state = json.loads((path / STATE_FILE).read_text())
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        if self.ema is not None:
            load_ema(self.ema, path / EMA_FILE)
        for i, module in enumerate(self.objective.checkpoint_modules()):
            module.load_state_dict(load_file(str(path / OBJECTIVE_STATE.format(i))))

    # ------------------------------------------------------------------ loop
    def _batches(self):
        """Endless batches; the order depends only on (seed, epoch), so a resumed run sees the same data."""
        per_epoch = len(self.loader)
        epoch, offset = divmod(self.step, per_epoch)
        while True:
            self.loader.set_epoch(epoch)
            loader = self.accelerator.skip_first_batches(self.loader, offset) if offset else self.loader
            yield from loader
            epoch, offset = epoch + 1, 0

    def _seed_step(self) -> None:
        """Seed torch, numpy and random from (seed, step, rank): the randomness of a step does not depend on what
        ran before it (data-loader iterators, validation, a resume), so resumed runs draw the same numbers."""
        seed = ((self.cfg.train.seed * 1_000_003 + self.step) * 1_009 + self.accelerator.process_index) % 2**63
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def _all_ranks(self, flag: bool, reduce: str) -> bool:
        """`flag` combined over processes ("all" or "any"), so every rank takes the same branch."""
        if self.accelerator.num_processes == 1:
            return flag
        flags = self.accelerator.gather(torch.tensor([float(flag)], device=self.accelerator.device))
        return bool(flags.min() > 0) if reduce == "all" else bool(flags.max() > 0)

    def _handle_nonfinite(self, what: str, phase: str) -> None:
        if self.cfg.train.nonfinite == "stop":
            raise NonFiniteError(f"non-finite {what} in phase {phase!r} at step {self.step}; the step was not "
                                 "applied and no checkpoint holds these values. Lower the learning rate, or set "
                                 "train.nonfinite=skip to skip such batches")
        self.skipped_steps += 1
        self._warn("skipping step %d: non-finite %s in phase %r (%d skipped so far)", self.step, what, phase,
                   self.skipped_steps)

    def train_step(self, batch: dict) -> dict[str, float]:
        """All phases the objective schedules at this step; each: loss, backward, clip, step, zero all. A
        non-finite loss or gradient (on any process) stops the step before its optimizer steps."""
        logs: dict[str, float] = {}
        for phase in self.objective.phases(self.step):
            group = self.groups[phase]
            losses = self.objective.loss(phase, batch, self.step)
            loss = losses["loss"]
            if not self._all_ranks(bool(torch.isfinite(loss.detach()).all()), "all"):
                bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()]
                self._zero_all()
                self._handle_nonfinite(f"loss ({', '.join(bad) or 'on another process'})", phase)
                return logs
            self.accelerator.backward(loss)
            params = [p for p in get_module(self.objective, group.module).parameters() if p.requires_grad]
            norm = self.accelerator.clip_grad_norm_(params, group.max_grad_norm or math.inf)
            if norm is not None and not torch.isfinite(norm):
                self._zero_all()
                self._handle_nonfinite("gradient norm", phase)
                return logs
            self.optimizers[phase].step()
            self.schedulers[phase].step()
            self._zero_all()
            self.objective.after_step(phase, self.step)
            for k, v in losses.items():
                logs[f"{phase}/{k}"] = float(v.detach())
        if self.ema is not None:
            self.ema.step(self._ema_parameters())
        return logs

    def _zero_all(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: object) -> None:
        if self._signal:
            raise KeyboardInterrupt  # a second signal aborts at once
        self._signal = signum
        self._warn("%s received: saving a checkpoint after this step, then stopping (send it again to abort)",
                   signal.Signals(signum).name)

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def _test_pause(self, where: str) -> None:
        """Test-only hook: with STEPDISTILL_TEST_PAUSE=<where>:<step> ("step" after a training step, "save"
        between a checkpoint's write and its rename) the main process creates <output_dir>/paused and waits
        up to 60 s for a signal, so tests can interrupt or SIGKILL the run at that exact point."""
        if os.environ.get(TEST_PAUSE_ENV) != f"{where}:{self.step}" or not self.accelerator.is_main_process:
            return
        (self.output_dir / "paused").touch()
        deadline = time.monotonic() + 60
        while not self._signal and time.monotonic() < deadline:
            time.sleep(0.02)

    # ------------------------------------------------------------------ run
    def train(self) -> TrainResult:
        """Train to train.max_steps (resuming if asked); SIGINT/SIGTERM save a checkpoint and stop early."""
        acc, t = self.accelerator, self.cfg.train
        if t.resume == "latest":
            for p in incomplete_checkpoints(self.output_dir):
                self._warn("skipping incomplete checkpoint %s (its write was interrupted)", p)
        resume_from = find_resume_checkpoint(self.output_dir, t.resume)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            logger.info("resumed from %s at step %d", resume_from, self.step)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.output_dir / "config.json",
                          json.dumps(config_to_dict(self.cfg), indent=2, default=str))
        if t.report_to != "none":
            acc.init_trackers("stepdistill", config=_flat_scalars(config_to_dict(self.cfg)))
        previous = self._install_signal_handlers()
        try:
            stopped = self._loop()
            if stopped:
                return TrainResult(self.output_dir, self.step, None, self.skipped_steps, stopped)
            final_dir = self.finish()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        acc.end_training()
        return TrainResult(self.output_dir, self.step, final_dir, self.skipped_steps)

    def _loop(self) -> int:
        """Steps until max_steps (returns 0) or until a signal, after saving a checkpoint (returns the signal)."""
        acc, t = self.accelerator, self.cfg.train
        batches = self._batches()
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not (t.progress and acc.is_local_main_process))
        started, start_step = time.perf_counter(), self.step
        while self.step < t.max_steps:
            batch = next(batches)
            self._seed_step()
            logs = self.train_step(batch)
            self.step += 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                logs["steps_per_s"] = (self.step - start_step) / max(time.perf_counter() - started, 1e-9)
                logs["skipped_steps"] = self.skipped_steps
                bar.set_postfix({k.split("/")[-1] if k.endswith("/loss") else k: f"{v:.4g}"
                                 for k, v in logs.items() if k.endswith("/loss") or k == "steps_per_s"})
                if t.report_to != "none":
                    acc.log(logs, step=self.step)
            saved = bool(t.checkpoint_every) and self.step % t.checkpoint_every == 0
            if saved:
                self.save_checkpoint()
            if t.validate_every and self.step % t.validate_every == 0:
                self.validate()
            self._test_pause("step")
            if self._all_ranks(bool(self._signal), "any"):
                path = self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.step}"
                if not saved:
                    path = self.save_checkpoint()
                self._warn("stopped at step %d; checkpoint %s; continue with train.resume=latest", self.step, path)
                bar.close()
                return self._signal or signal.SIGTERM
        bar.close()
        return 0

    # ------------------------------------------------------------------ outputs
    def generator_for_inference(self):
        """The unwrapped generator, with EMA weights copied in when EMA is on."""
        generator = self.objective.generator
        generator.backbone = self.accelerator.unwrap_model(generator.backbone)
        if self.ema is not None:
            self.ema.copy_to(self._ema_parameters())
        return generator

    @torch.no_grad()
    def validate(self) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        from stepdistill.export import save_preview

        out = self.output_dir / "samples" / f"step-{self.step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        generator = self.objective.generator
        if self.ema is not None:
            self.ema.store(self._ema_parameters())
            self.ema.copy_to(self._ema_parameters())
        try:
            save_preview(generator, self.objective.source, self.cfg.train.num_validation_samples, out,
                         seed=self.cfg.train.seed)
        finally:
            if self.ema is not None:
                self.ema.restore(self._ema_parameters())
        return out

    def finish(self) -> Path:
        """Final checkpoint, preview and the exported student."""
        from stepdistill.export import export_student

        acc = self.accelerator
        if self.cfg.train.checkpoint_every:
            self.save_checkpoint()
        self.validate()
        final_dir = self.output_dir / "final"
        if acc.is_main_process:
            export_student(self.generator_for_inference(), final_dir)
        acc.wait_for_everyone()
        return final_dir


def _flat_scalars(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_scalars(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def train(cfg: Config) -> TrainResult:
    return Trainer(cfg).train()
