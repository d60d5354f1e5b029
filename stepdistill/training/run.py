"""One training run as `stepdistill train` runs it: train (a signal that stopped it becomes `Stopped`, naming the
checkpoint to continue from), and measure a student of the analytic teacher against its exact mixture (logged to
the tracker and written to metrics.json)."""
from __future__ import annotations

import json
import signal

from stepdistill.config import Config
from stepdistill.errors import Stopped
from stepdistill.training.hooks import Hook
from stepdistill.training.trainer import Trainer

MIXTURE_SAMPLES = 4096


class MixtureMetrics(Hook):
    """At the end of a run on the analytic teacher: the student's distance to the true mixture."""

    def __init__(self) -> None:
        self.metrics: dict | None = None

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.objective.teacher.mixture is None or not trainer.accelerator.is_main_process:
            return
        from stepdistill.evaluation.distribution import evaluate_generator

        self.metrics = evaluate_generator(trainer.generator_for_inference(), n=MIXTURE_SAMPLES,
                                          seed=trainer.cfg.train.seed).as_dict()
        trainer.report.log_metrics(self.metrics, trainer.step)


def run_training(cfg: Config) -> dict:
    """Train a config to the end; returns the summary the command line prints."""
    metrics = MixtureMetrics()
    trainer = Trainer(cfg, hooks=[metrics])
    result = trainer.train()
    if result.interrupted:
        name = signal.Signals(result.interrupted).name
        raise Stopped(result.interrupted, f"stopped by {name} at step {result.step} after saving checkpoint-"
                                          f"{result.step} in {result.output_dir / 'checkpoints'}; continue with "
                                          "train.resume=latest")
    summary: dict = {"output_dir": str(result.output_dir), "steps": result.step, "export": str(result.final_dir),
                     "skipped_steps": result.skipped_steps}
    if metrics.metrics is not None:
        summary["metrics"] = metrics.metrics
        summary["metrics_protocol"] = (f"{MIXTURE_SAMPLES} samples vs the true mixture; SW2 (256 projections), "
                                       "energy distance")
        (result.output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary
