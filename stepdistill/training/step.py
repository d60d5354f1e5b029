"""One training step: every phase the objective schedules (loss, backward, clip, optimizer step), the learning-rate
schedules and the generator EMA, with the non-finite policy."""
from __future__ import annotations

import logging
import math

import torch

from stepdistill.errors import RunFailed
from stepdistill.objectives.base import Objective, get_module
from stepdistill.training.accel import all_ranks, clip_grad_norm

logger = logging.getLogger(__name__)
GENERATOR_MODULE = "generator.backbone"


class NonFiniteError(RunFailed):
    """A loss, gradient or weight was NaN/inf and training cannot go on as configured."""


class StepRunner:
    def __init__(self, accelerator, objective: Objective, optimizers: dict, schedulers: dict, ema, nonfinite: str
                 ) -> None:
        self.accelerator, self.objective = accelerator, objective
        self.optimizers, self.schedulers, self.ema = optimizers, schedulers, ema
        self.groups = {g.name: g for g in objective.optimizer_groups()}
        self.nonfinite = nonfinite
        self.skipped_steps = 0

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        paths = dict.fromkeys(g.module for g in self.groups.values())
        return [(f"{path}.{n}", p) for path in paths
                for n, p in get_module(self.objective, path).named_parameters() if p.requires_grad]

    def zero_all(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def _nonfinite(self, what: str, phase: str, step: int) -> None:
        if self.nonfinite == "stop":
            raise NonFiniteError(f"non-finite {what} in phase {phase!r} at step {step}; the step was not "
                                 "applied and no checkpoint holds these values. Lower the learning rate, or set "
                                 "train.nonfinite=skip to skip such batches")
        self.skipped_steps += 1
        if self.accelerator.is_main_process:
            logger.warning("skipping step %d: non-finite %s in phase %r (%d skipped so far)", step, what, phase,
                           self.skipped_steps)

    def run(self, batch: dict, step: int) -> dict[str, float]:
        """All phases of `step`; each: loss, backward, clip, optimizer step, zero all. A non-finite loss or gradient
        (on any process) stops the step before its optimizer steps. Every learning-rate schedule advances once per
        step whichever phases ran (as the official DMD2 code steps both); the EMA follows generator updates only."""
        logs: dict[str, float] = {}
        stepped = []
        for phase in self.objective.phases(step):
            group = self.groups[phase]
            losses = self.objective.loss(phase, batch, step)
            loss = losses["loss"]
            if not all_ranks(self.accelerator, bool(torch.isfinite(loss.detach()).all()), "all"):
                bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()]
                self.zero_all()
                self._nonfinite(f"loss ({', '.join(bad) or 'on another process'})", phase, step)
                return logs
            self.accelerator.backward(loss)
            params = [p for p in get_module(self.objective, group.module).parameters() if p.requires_grad]
            norm = clip_grad_norm(self.accelerator, params, group.max_grad_norm or math.inf)
            if norm is not None and not torch.isfinite(norm):
                self.zero_all()
                self._nonfinite("gradient norm", phase, step)
                return logs
            self.optimizers[phase].step()
            self.zero_all()
            self.objective.after_step(phase, step)
            stepped.append(group.module)
            for k, v in losses.items():
                logs[f"{phase}/{k}"] = float(v.detach())
        for name, scheduler in self.schedulers.items():
            scheduler.step()
            logs[f"lr/{name}"] = scheduler.get_last_lr()[0]
        if self.ema is not None and GENERATOR_MODULE in stepped:
            self.ema.step()
        return logs
