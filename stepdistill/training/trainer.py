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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stepdistill.config import Config, ConfigError, check_teacher_source, config_to_dict
from stepdistill.data import ConditionDataset, ImageFolderDataset, read_prompts
from stepdistill.data.partition import check_partition_config, restrict_to_part
from stepdistill.io import write_atomic
from stepdistill.objectives import Objective, build_objective, objective_class
from stepdistill.objectives.base import get_module
from stepdistill.training import accel, checkpoint, options
from stepdistill.training.ema import EMA_FILE, GeneratorEMA
from stepdistill.training.hooks import DEFAULT_HOOKS, Hook, save_preview
from stepdistill.training.step import GENERATOR_MODULE, NonFiniteError, StepRunner

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
        self.output_dir = Path(t.output_dir)
        self.accelerator = acc = accel.make_accelerator(t, self.output_dir)
        set_seed(t.seed)
        self.hooks = [factory() for factory in DEFAULT_HOOKS] + list(hooks or [])
        self._check_output_dir()
        self._preflight(load_teacher=objective is None)
        self.optimizer_class = options.optimizer_class(t.optimizer)  # before the teacher loads
        self.objective = objective or build_objective(cfg, acc.device)
        self._check_compatible()
        accel.check_distributed(acc.distributed_type, [g.name for g in self.objective.optimizer_groups()])
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

    # ------------------------------------------------------------------ setup
    def warn(self, message: str, *args: object) -> None:
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
        if t.resume and {k: v for k, v in previous.items() if k != "train"} == \
                {k: v for k, v in current.items() if k != "train"}:
            return
        if t.resume:
            raise ConfigError(f"train.output_dir {self.output_dir} holds a run with a different config: resume it "
                              "with its own config, or choose another output_dir")
        raise ConfigError(f"train.output_dir {self.output_dir} already holds a run: set train.resume=latest to "
                          "continue it, train.overwrite=true to replace it, or choose another output_dir")

    def _preflight(self, load_teacher: bool) -> None:
        """Checks that need no model, run before the teacher loads: its source, options, the objective's own
        refusals, the prompt file, the real images."""
        cfg = self.cfg
        if load_teacher:
            check_teacher_source(cfg.teacher)
        options.check_attention(cfg.train.attention)
        if cfg.teacher.offload and (refusal := options.teacher_offload_refusal(cfg)):
            raise ConfigError(refusal)
        objective_class(cfg.objective.name).preflight(cfg)
        check_partition_config(cfg.data.partition)
        if cfg.data.prompts_file:
            read_prompts(cfg.data.prompts_file)
        if cfg.data.image_dir:
            images = ImageFolderDataset(cfg.data.image_dir, cfg.data.resolution, cfg.data.bad_images)
            if images.num_skipped:
                self.warn("data.image_dir: skipped %d bad files (%s); training on %d images", images.num_skipped,
                          ", ".join(f"{len(v)} {k}" for k, v in images.skipped.items()), len(images))

    def _check_compatible(self) -> None:
        """Teacher, student and objective fit together (before pair generation or any training)."""
        generator = self.objective.generator
        kind, prediction = generator.schedule.kind, generator.prediction_type
        if (prediction == "flow" and kind != "flow") or (prediction == "v_prediction" and kind == "flow"):
            raise ConfigError(f"student.prediction_type={prediction} does not fit the student's {kind} schedule: "
                              f"unset student.prediction_type, or set student.schedule="
                              f"{'flow' if prediction == 'flow' else 'teacher'}")
        self.objective.check_compatible()

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
        ema = None
        if t.ema_decay > 0:
            generator = get_module(self.objective, GENERATOR_MODULE)
            ema = GeneratorEMA([p for p in generator.parameters() if p.requires_grad], t.ema_decay)
        dataset = self.objective.dataset()
        if self.cfg.data.partition.parts > 1 and not isinstance(dataset, ConditionDataset):
            raise ConfigError(f"data.partition restricts the conditions an objective samples, but objective "
                              f"{self.cfg.objective.name} trains on {type(dataset).__name__}: set "
                              "data.partition.parts=1 for it (e.g. a shared TSM or regression stage)")
        loader = DataLoader(dataset, batch_size=t.batch_size, shuffle=True, drop_last=True,
                            num_workers=self.cfg.data.num_workers)
        optimizers, schedulers, self.loader = accel.prepare(acc, self.objective, optimizers, schedulers, loader)
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
    def _check_weights_finite(self) -> None:
        bad = [name for name, p in self.runner.trainable() if not torch.isfinite(p).all()]
        if self.ema is not None and not self.ema.all_finite():
            bad.append("EMA")
        if bad:
            last = checkpoint.list_checkpoints(self.output_dir)
            raise NonFiniteError(f"step {self.step}: non-finite weights in {', '.join(bad[:3])}; no checkpoint was "
                                 "written. Resume from the last complete checkpoint "
                                 f"({last[-1] if last else 'none'}) with a lower learning rate")

    def save_checkpoint(self) -> Path:
        """Everything a resume needs, written atomically; weights are checked first, so a checkpoint never holds
        NaN/inf."""
        acc = self.accelerator
        self._check_weights_finite()
        tmp = self.output_dir / "checkpoints" / f"{checkpoint.TMP_PREFIX}{self.step}"
        if acc.is_main_process:
            checkpoint.begin_checkpoint(self.output_dir, self.step)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        final = tmp.with_name(f"{checkpoint.CHECKPOINT_PREFIX}{self.step}")
        if acc.is_main_process:
            if self.ema is not None:
                self.ema.save(tmp / EMA_FILE)
            for i, module in enumerate(self.objective.checkpoint_modules()):
                save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                          str(tmp / checkpoint.OBJECTIVE_STATE.format(i)))
            checkpoint.write_trainer_state(tmp, {"step": self.step, "skipped_steps": self.skipped_steps})
            for hook in self.hooks:
                hook.on_checkpoint_written(self, tmp)
            final = checkpoint.finish_checkpoint(tmp, self.step, self.cfg.train.checkpoints_limit)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything save_checkpoint wrote."""
        state = checkpoint.load_accelerate_state(self.accelerator, path)
        self.step, self.runner.skipped_steps = state["step"], state["skipped_steps"]
        if self.ema is not None:
            self.ema.load(path / EMA_FILE)
        for i, module in enumerate(self.objective.checkpoint_modules()):
            module.load_state_dict(load_file(str(path / checkpoint.OBJECTIVE_STATE.format(i))))

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
        if t.resume == "latest":
            for p in checkpoint.incomplete_checkpoints(self.output_dir):
                self.warn("skipping incomplete checkpoint %s (its write was interrupted)", p)
        resume_from = checkpoint.find_resume_checkpoint(self.output_dir, t.resume)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            logger.info("resumed from %s at step %d", resume_from, self.step)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.output_dir / "config.json", json.dumps(config_to_dict(self.cfg), indent=2, default=str))
        if t.report_to != "none":
            acc.init_trackers("stepdistill", config=_flat_scalars(config_to_dict(self.cfg)))
        for hook in self.hooks:
            hook.on_train_start(self)
        with self._signals_caught():
            stopped = self._loop()
            if stopped:
                return TrainResult(self.output_dir, self.step, None, self.skipped_steps, stopped)
            final_dir = self.finish()
        for tracker in acc.trackers:  # not end_training(): it would also end the process group a recipe's
            tracker.finish()          # next stage trains in
        return TrainResult(self.output_dir, self.step, final_dir, self.skipped_steps)

    def _loop(self) -> int:
        """Steps until max_steps (returns 0) or until a signal, after saving a checkpoint (returns the signal)."""
        acc, t = self.accelerator, self.cfg.train
        batches = self.batches()
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not (t.progress and acc.is_local_main_process))
        started, start_step = time.perf_counter(), self.step
        while self.step < t.max_steps:
            batch = next(batches)
            self.seed_step()
            logs = self.train_step(batch)
            self.step += 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                logs["steps_per_s"] = (self.step - start_step) / max(time.perf_counter() - started, 1e-9)
                logs["skipped_steps"] = self.skipped_steps
                bar.set_postfix({k.split("/")[0] if k.endswith("/loss") else k: f"{v:.4g}"
                                 for k, v in logs.items() if k.endswith("/loss") or k == "steps_per_s"})
                if t.report_to != "none":
                    acc.log(logs, step=self.step)
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
                bar.close()
                return self._signal or signal.SIGTERM
        bar.close()
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
    def _inference_generator(self, ema: bool) -> Iterator:
        """The generator with its raw backbone (and EMA weights inside the block, if asked and on)."""
        generator = self.objective.generator
        prepared = generator.backbone
        generator.backbone = accel.unwrap(self.accelerator, prepared)
        try:
            if ema and self.ema is not None:
                with self.ema.applied():
                    yield generator
            else:
                yield generator
        finally:
            generator.backbone = prepared

    def generator_for_inference(self):
        """The generator for export: its raw backbone, with the EMA weights copied in when EMA is on (for good)."""
        generator = self.objective.generator
        generator.backbone = accel.unwrap(self.accelerator, generator.backbone)
        if self.ema is not None:
            self.ema.copy_to_model()
        return generator

    @torch.no_grad()
    def validate(self) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        out = self.output_dir / "samples" / f"step-{self.step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        with self._inference_generator(ema=True) as generator:
            return save_preview(generator, self.objective.source, self.cfg.train.num_validation_samples, out,
                                seed=self.cfg.train.seed)

    def finish(self) -> Path:
        """Final checkpoint, preview and the exported student."""
        acc = self.accelerator
        if self.cfg.train.checkpoint_every:
            self.save_checkpoint()
        self.validate()
        final_dir = self.output_dir / "final"
        if acc.is_main_process:
            self.objective.export(self.generator_for_inference(), final_dir)
        acc.wait_for_everyone()
        for hook in self.hooks:
            hook.on_train_end(self)
        return final_dir


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of training step `step` on process `rank`."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % 2**63


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
