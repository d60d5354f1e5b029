"""The trainer: wires a config's objective to accelerate, optimizers, schedules, EMA, checkpoints and hooks, and
runs the loop. It knows nothing of any objective's math."""
from __future__ import annotations

import json
import logging
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from stepdistill.config import Config, ConfigError, config_to_dict
from stepdistill.config.preflight import check_mixed_precision, check_output_dir, resolve_report_to
from stepdistill.data import ConditionDataset
from stepdistill.data.partition import restrict_to_part
from stepdistill.errors import RunFailed
from stepdistill.io import write_atomic
from stepdistill.objectives import Objective, build_objective
from stepdistill.objectives.base import get_module
from stepdistill.training import accel, checkpoint, options, preflight, rundir, saving
from stepdistill.training.ema import GeneratorEMA
from stepdistill.training.guards import SampleGuard
from stepdistill.training.hooks import DEFAULT_HOOKS, Hook, save_preview
from stepdistill.training.reporting import RunReport, flat_scalars
from stepdistill.training.restore import finish_export
from stepdistill.training.step import GENERATOR_MODULE, StepRunner

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    final_dir: Path | None
    skipped_steps: int
    interrupted: int = 0  # the signal (SIGINT/SIGTERM) that stopped the run after a checkpoint; 0: it finished


class Trainer:
    def __init__(self, cfg: Config, objective: Objective | None = None, hooks: list[Hook] | None = None) -> None:
        self.cfg, t = cfg, cfg.train
        if t.device_threads:
            torch.set_num_threads(t.device_threads)
        self.output_dir = check_output_dir(t.output_dir)
        self.tracker = resolve_report_to(t.report_to)
        check_mixed_precision(t.mixed_precision, torch.cuda.is_available())
        self.accelerator = acc = accel.make_accelerator(t, self.output_dir, self.tracker)
        set_seed(t.seed)
        self.hooks = [factory() for factory in DEFAULT_HOOKS] + [SampleGuard()] + list(hooks or [])
        preflight.check_inputs(cfg, load_teacher=objective is None, warn=self.warn)
        rundir.check_run_dir(t, self.output_dir)
        self.identity = checkpoint.run_identity(config_to_dict(cfg))
        self.config_hash = checkpoint.config_hash(self.identity)
        if t.resume in ("latest", "latest-valid"):
            for p in checkpoint.incomplete_checkpoints(self.output_dir):
                self.warn("skipping incomplete checkpoint %s (its write was interrupted)", p)
        self.resume_from = checkpoint.find_resume_checkpoint(self.output_dir, t.resume, self.warn)
        if self.resume_from is not None:
            preflight.check_checkpoint_config(self.resume_from, self.identity, self.config_hash, self.warn)
            checkpoint.check_layout(self.resume_from, acc.num_processes, accel.is_sharded(acc))
        self.optimizer_class = options.optimizer_class(t.optimizer)  # before the teacher loads
        self._start_run_dir()
        self.objective = objective or build_objective(cfg, acc.device)
        preflight.check_generator(self.objective.generator, cfg)
        self.objective.check_compatible()
        accel.check_distributed(acc.distributed_type, [g.name for g in self.objective.optimizer_groups()])
        if accel.is_sharded(acc) and t.sample_stats_every:
            raise ConfigError("train.sample_stats_every samples the generator on the main process alone, which a "
                              "sharded (FSDP) generator cannot do: set train.sample_stats_every=0 under FSDP")
        self.objective.to(acc.device)  # the teacher is no submodule: its backbone stays where it was loaded
        with acc.main_process_first():
            self.objective.prepare_data(str(self.output_dir), acc.device)
            restrict_to_part(self.objective.source, cfg.data.partition, self.output_dir)
        if t.gradient_checkpointing:
            options.enable_gradient_checkpointing(self.objective)
        options.apply_speed_options(self.objective, t, self.warn)
        if cfg.teacher.offload:  # after pair caching, which runs the teacher resident
            if acc.device.type == "cpu":
                self.warn("teacher.offload=true has no effect on a CPU run: the teacher's weights are in CPU memory")
            else:
                options.offload_teacher(self.objective.teacher, acc.device)
        self._build_optimizers()
        self.step = 0
        self._signal = 0
        self.report: RunReport | None = None

    # ------------------------------------------------------------------ setup
    def warn(self, message: str, *args: object) -> None:
        """A warning from the main process only."""
        if self.accelerator.is_main_process:
            logger.warning(message, *args)

    def _start_run_dir(self) -> None:
        """Move an old run aside for train.overwrite, create the folder and record the config (main process)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.cfg.train.overwrite:
                aside = rundir.move_aside(self.output_dir)
                if aside is not None:
                    logger.warning("train.overwrite: moved the previous contents of %s to %s (delete it when you no "
                                   "longer need it)", self.output_dir, aside)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.output_dir / rundir.RUN_MARKER,
                         json.dumps(config_to_dict(self.cfg), indent=2, default=str))
        acc.wait_for_everyone()

    def _build_optimizers(self) -> None:
        acc, t = self.accelerator, self.cfg.train
        optimizers, schedulers = {}, {}
        for g in self.objective.optimizer_groups():
            params = [p for p in get_module(self.objective, g.module).parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"optimizer group {g.name!r}: module {g.module} has no trainable parameters")
            if t.optimizer == "adamw_fused":
                options.check_fused_adamw(params[0].device)
            optimizers[g.name] = self.optimizer_class(params, lr=g.lr, betas=g.betas, eps=g.eps,
                                                      weight_decay=g.weight_decay)
            schedulers[g.name] = options.lr_scheduler(t, optimizers[g.name], acc.num_processes)
        dataset = self.objective.dataset()
        if self.cfg.data.partition.parts > 1 and not isinstance(dataset, ConditionDataset):
            raise ConfigError(f"data.partition restricts the conditions an objective samples, but objective "
                              f"{self.cfg.objective.name} trains on {type(dataset).__name__}: set "
                              "data.partition.parts=1 for it (e.g. a shared TSM or regression stage)")
        loader = DataLoader(dataset, batch_size=t.batch_size, shuffle=True, drop_last=True,
                            num_workers=self.cfg.data.num_workers)
        optimizers, schedulers, self.loader = accel.prepare(acc, self.objective, optimizers, schedulers, loader)
        ema = None
        if t.ema_decay > 0:  # after prepare: FSDP2 replaces the parameters by their shards
            generator = get_module(self.objective, GENERATOR_MODULE)
            ema = GeneratorEMA([p for p in generator.parameters() if p.requires_grad], t.ema_decay)
        if len(self.loader) == 0:
            raise ConfigError(f"train.batch_size {t.batch_size} x {acc.num_processes} processes is larger than the "
                              f"dataset ({len(dataset)} items): lower train.batch_size")
        self.runner = StepRunner(acc, self.objective, optimizers, schedulers, ema, t.nonfinite)

    @property
    def optimizers(self) -> dict:
        return self.runner.optimizers

    @property
    def ema(self) -> GeneratorEMA | None:
        return self.runner.ema

    @property
    def skipped_steps(self) -> int:
        return self.runner.skipped_steps

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Everything a resume needs, written atomically (training/saving.py)."""
        return saving.save_checkpoint(self)

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything save_checkpoint wrote."""
        saving.load_checkpoint(self, path)

    # ------------------------------------------------------------------ steps
    def batches(self) -> Iterator[dict]:
        """Endless batches; the order depends only on (seed, epoch), so a resumed run sees the same data."""
        per_epoch = len(self.loader)
        epoch, offset = divmod(self.step, per_epoch)
        while True:
            self.loader.set_epoch(epoch)
            loader = self.accelerator.skip_first_batches(self.loader, offset) if offset else self.loader
            yield from loader
            epoch, offset = epoch + 1, 0

    def seed_step(self) -> None:
        """Seed torch, numpy and random from (seed, step, rank): the randomness of a step does not depend on what
        ran before it (data-loader iterators, validation, a resume), so resumed runs draw the same numbers."""
        seed = step_seed(self.cfg.train.seed, self.step, self.accelerator.process_index)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def train_step(self, batch: dict) -> dict[str, float]:
        """The phases the objective schedules at the current step (no counting, seeding or I/O)."""
        return self.runner.run(batch, self.step)

    def train_steps(self, n: int) -> dict[str, float]:
        """n seeded steps as the loop takes them, without checkpoints, previews or hooks; the last step's logs."""
        batches, logs = self.batches(), {}
        for _ in range(n):
            batch = next(batches)
            self.seed_step()
            logs = self.train_step(batch)
            self.step += 1
        return logs

    # ------------------------------------------------------------------ run
    def train(self) -> TrainResult:
        """Train to train.max_steps (resuming if asked); SIGINT/SIGTERM save a checkpoint and stop early."""
        acc, t = self.accelerator, self.cfg.train
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
            if acc.is_main_process:
                logger.info("resumed from %s at step %d (%s)", self.resume_from.name, self.step, self.resume_from)
        if self.tracker:
            acc.init_trackers("stepdistill", config=flat_scalars(config_to_dict(self.cfg)))
        self.report = RunReport(acc, self.objective.phases, t.max_steps, self.step, t.progress,
                                tracking=self.tracker is not None)
        for hook in self.hooks:
            hook.on_train_start(self)
        try:
            with self._signals_caught():
                stopped = self._loop()
                if stopped:
                    return TrainResult(self.output_dir, self.step, None, self.skipped_steps, stopped)
                final_dir = self.finish()
        finally:
            self.report.close()
            for tracker in acc.trackers:  # not end_training(): it would also end the process group a recipe's
                tracker.finish()          # next stage trains in
        return TrainResult(self.output_dir, self.step, final_dir, self.skipped_steps)

    def _loop(self) -> int:
        """Steps until max_steps (returns 0) or until a signal, after saving a checkpoint (returns the signal)."""
        acc, t = self.accelerator, self.cfg.train
        batches = self.batches()
        started, start_step = time.perf_counter(), self.step
        while self.step < t.max_steps:
            batch = next(batches)
            self.seed_step()
            logs = self.train_step(batch)
            self.report.step(self.step, logs)
            self.step += 1
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                self.report.flush(self.step, {
                    "steps_per_s": (self.step - start_step) / max(time.perf_counter() - started, 1e-9),
                    "skipped_steps": self.skipped_steps})
            saved = bool(t.checkpoint_every) and self.step % t.checkpoint_every == 0
            if saved:
                self.save_checkpoint()
            if t.validate_every and self.step % t.validate_every == 0:
                self.validate()
            for hook in self.hooks:
                hook.on_step_end(self, logs)
            if accel.all_ranks(acc, bool(self._signal), "any"):
                path = self.output_dir / "checkpoints" / f"{checkpoint.CHECKPOINT_PREFIX}{self.step}"
                if not saved:
                    path = self.save_checkpoint()
                self.warn("stopped at step %d; checkpoint %s; continue with train.resume=latest", self.step, path)
                return self._signal or signal.SIGTERM
        return 0

    @property
    def stop_requested(self) -> int:
        """The signal that asked the run to stop (0: none)."""
        return self._signal

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._signal:
            raise KeyboardInterrupt  # a second signal aborts at once
        self._signal = signum
        self.warn("%s received: saving a checkpoint after this step, then stopping (send it again to abort)",
                  signal.Signals(signum).name)

    @contextmanager
    def _signals_caught(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask for a checkpoint and a clean stop after the current step (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # ------------------------------------------------------------------ outputs
    @contextmanager
    def inference_generator(self, ema: bool = True) -> Iterator:
        """The generator with its raw backbone (and the EMA weights inside the block, if asked and on). A sharded
        backbone is gathered into a plain copy on the main process: every process enters the block then."""
        generator, acc = self.objective.generator, self.accelerator
        prepared = generator.backbone
        with self.ema.applied() if ema and self.ema is not None else nullcontext():
            generator.backbone = accel.gathered(acc, prepared) if accel.module_is_sharded(prepared) else \
                accel.unwrap(acc, prepared)
            try:
                yield generator
            finally:
                generator.backbone = prepared

    def generator_for_inference(self):
        """The generator for export: its raw backbone, with the EMA weights copied in when EMA is on (for good). A
        sharded backbone is gathered once into a plain copy on the main process (every process calls this then)."""
        generator = self.objective.generator
        if accel.module_is_sharded(generator.backbone):
            if self.ema is not None:
                self.ema.copy_to_model()
            generator.backbone = accel.gathered(self.accelerator, generator.backbone) or generator.backbone
            return generator
        generator.backbone = accel.unwrap(self.accelerator, generator.backbone, keep_autocast=False)
        if self.ema is not None and not self.ema.sharded:  # a gathered backbone holds the EMA weights already
            self.ema.copy_to_model()
        return generator

    @torch.no_grad()
    def validate(self) -> Path | None:
        """A preview of the current generator (EMA weights) in samples/, also sent to the tracker."""
        sharded = accel.module_is_sharded(self.objective.generator.backbone)
        if not (self.accelerator.is_main_process or sharded):
            return None
        out = self.output_dir / "samples" / f"step-{self.step:07d}.png"
        with self.inference_generator(ema=True) as generator:
            if not self.accelerator.is_main_process:
                return None
            out.parent.mkdir(parents=True, exist_ok=True)
            save_preview(generator, self.objective.source, self.cfg.train.num_validation_samples, out,
                         seed=self.cfg.train.seed)
        if self.report is not None:
            self.report.log_image("samples", out, self.step)
        return out

    def finish(self) -> Path:
        """Final checkpoint, preview and the exported student."""
        acc = self.accelerator
        t = self.cfg.train
        if t.checkpoint_every:
            self.save_checkpoint()
        if not (t.validate_every and self.step % t.validate_every == 0):  # the loop just made this step's preview
            self.validate()
        final_dir = self.output_dir / "final"
        generator = self.generator_for_inference()  # every process: a sharded generator is gathered
        if acc.is_main_process:
            try:
                self.objective.export(generator, final_dir)
            except Exception as e:
                raise self._export_failed(final_dir, e) from e
            finish_export(final_dir, self.cfg, self.objective, self.step)
        acc.wait_for_everyone()
        for hook in self.hooks:
            hook.on_train_end(self)
        return final_dir

    def _export_failed(self, final_dir: Path, error: Exception) -> Exception:
        """The error of a failed export, saying that the training is kept and how to export it again."""
        saved = checkpoint.list_checkpoints(self.output_dir)
        kept = (f"the trained state is in {saved[-1]}: fix the cause, then `stepdistill export {saved[-1]} --out "
                f"{final_dir}`" if saved else "no checkpoint was kept (train.checkpoint_every=0)")
        message = f"training finished but the export to {final_dir} failed: {str(error).splitlines()[0]}; {kept}"
        return ConfigError(message) if isinstance(error, ValueError) else RunFailed(message)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of training step `step` on process `rank`."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % 2**63


def train(cfg: Config) -> TrainResult:
    return Trainer(cfg).train()
