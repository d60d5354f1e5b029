"""The trainer on accelerate. It owns optimizers, the objective's phase schedule, mixed precision, clipping,
EMA, checkpoints, logs and validation pictures, and knows nothing of any objective's math."""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stepdistill.config import Config, config_to_dict
from stepdistill.data import ConditionSource, read_prompts
from stepdistill.objectives import REGISTRY, Objective
from stepdistill.objectives.base import get_module, set_module
from stepdistill.students import build_student
from stepdistill.teachers import load_teacher

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN/inf and the config says to stop."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    final_dir: Path
    skipped_steps: int


def resolve_mixed_precision(value: str) -> str:
    if value == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return value


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts once its state file is in place)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def find_resume_checkpoint(output_dir: Path, resume: str) -> Path | None:
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"train.resume: {path} is not a complete checkpoint (no {STATE_FILE}); "
                                    "use train.resume=latest or a checkpoint-N folder")
        return path
    root = output_dir / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if not (p / STATE_FILE).is_file():
                logger.warning("skipping incomplete checkpoint %s (interrupted write)", p)
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def build_objective(cfg: Config, device: torch.device | str) -> Objective:
    """Teacher, conditions, student and objective as the config describes them."""
    teacher = load_teacher(cfg.teacher, device)
    prompts = read_prompts(cfg.data.prompts_file) if cfg.data.prompts_file else None
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
        acc = self.accelerator
        self.objective = objective or build_objective(cfg, acc.device)
        self.objective.to(acc.device)
        with acc.main_process_first():
            self.objective.prepare_data(str(self.output_dir), acc.device)
        if t.gradient_checkpointing:
            backbone = self.objective.generator.backbone
            if not hasattr(backbone, "enable_gradient_checkpointing"):
                raise ValueError(f"train.gradient_checkpointing: {type(backbone).__name__} does not support it")
            backbone.enable_gradient_checkpointing()
        self._build_optimizers()
        self.ema = None
        if t.ema_decay > 0:
            self.ema = EMAModel(self._ema_parameters(), decay=t.ema_decay)
            self.ema.to(acc.device)
            acc.register_for_checkpointing(self.ema)
        self.step = 0
        self.skipped_steps = 0

    # ------------------------------------------------------------------ setup
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
            self.optimizers[g.name] = torch.optim.AdamW(params, lr=g.lr, betas=g.betas, eps=g.eps,
                                                        weight_decay=g.weight_decay)
            self.schedulers[g.name] = get_scheduler(t.lr_scheduler, self.optimizers[g.name],
                                                    num_warmup_steps=t.lr_warmup_steps,
                                                    num_training_steps=t.max_steps)
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
            raise ValueError(f"train.batch_size {t.batch_size} is larger than the dataset "
                             f"({len(self.objective.dataset())} items)")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """accelerate save_state into a temporary folder, then an atomic rename; prune old checkpoints."""
        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.step}"
        tmp = root / f".tmp-{CHECKPOINT_PREFIX}{self.step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"step": self.step, "skipped_steps": self.skipped_steps}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in list_checkpoints(self.output_dir)[:-self.cfg.train.checkpoints_limit]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        self.accelerator.load_state(str(path))
        state = json.loads((path / STATE_FILE).read_text())
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]

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

    def _handle_nonfinite(self, what: str, phase: str) -> None:
        if self.cfg.train.nonfinite == "stop":
            raise NonFiniteError(f"non-finite {what} in phase {phase!r} at step {self.step}; no checkpoint was "
                                 "written with these weights. Lower the learning rate, or set "
                                 "train.nonfinite=skip to skip such batches")
        self.skipped_steps += 1
        logger.warning("skipping step %d: non-finite %s in phase %r", self.step, what, phase)

    def train_step(self, batch: dict) -> dict[str, float]:
        """All phases the objective schedules at this step; each: loss, backward, clip, step, zero all."""
        logs: dict[str, float] = {}
        for phase in self.objective.phases(self.step):
            group = self.groups[phase]
            losses = self.objective.loss(phase, batch, self.step)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                bad = [k for k, v in losses.items() if not torch.isfinite(v)]
                self._zero_all()
                self._handle_nonfinite(f"loss ({', '.join(bad)})", phase)
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

    def train(self) -> TrainResult:
        acc, t = self.accelerator, self.cfg.train
        resume_from = find_resume_checkpoint(self.output_dir, t.resume)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            logger.info("resumed from %s at step %d", resume_from, self.step)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2, default=str))
        if t.report_to != "none":
            acc.init_trackers("stepdistill", config=_flat_scalars(config_to_dict(self.cfg)))
        batches = self._batches()
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not (t.progress and acc.is_local_main_process))
        started, start_step = time.perf_counter(), self.step
        while self.step < t.max_steps:
            logs = self.train_step(next(batches))
            self.step += 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                rate = (self.step - start_step) / max(time.perf_counter() - started, 1e-9)
                logs["steps_per_s"] = rate
                logs["skipped_steps"] = self.skipped_steps
                bar.set_postfix({k.split("/")[-1] if k.endswith("/loss") else k: f"{v:.4g}"
                                 for k, v in logs.items() if k.endswith("/loss") or k == "steps_per_s"})
                if t.report_to != "none":
                    acc.log(logs, step=self.step)
            if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                self.save_checkpoint()
            if t.validate_every and self.step % t.validate_every == 0:
                self.validate()
        bar.close()
        final_dir = self.finish()
        acc.end_training()
        return TrainResult(self.output_dir, self.step, final_dir, self.skipped_steps)

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
