"""One training run as `stepdistill train` runs it: train (a signal that stopped it becomes `Stopped`, naming the
checkpoint to continue from), and measure the student: one of the analytic teacher against its exact mixture
(logged to the tracker), one of a miniature teacher (digits, shapes) with the demo's metrics; both printed and
written to metrics.json. A recipe's run says which finished stages it skipped and measures its last export."""
from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

from stepdistill.config import Config
from stepdistill.errors import Stopped
from stepdistill.training.hooks import Hook
from stepdistill.training.trainer import Trainer, TrainResult

MIXTURE_SAMPLES = 4096
MINIATURE_PER_CLASS = 50  # the demo's evaluation (stepdistill.miniature.demo.EVAL_PER_CLASS)
logger = logging.getLogger(__name__)


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


def raise_if_stopped(result: TrainResult) -> None:
    """A run a signal stopped ends the command with the signal's exit code and says where to continue."""
    if result.interrupted:
        name = signal.Signals(result.interrupted).name
        raise Stopped(result.interrupted, f"stopped by {name} at step {result.step} after saving checkpoint-"
                                          f"{result.step} in {result.output_dir / 'checkpoints'}; continue with "
                                          "train.resume=latest")


def run_training(cfg: Config) -> dict:
    """Train a config to the end; returns the summary the command line prints."""
    metrics = MixtureMetrics()
    trainer = Trainer(cfg, hooks=[metrics])
    result = trainer.train()
    raise_if_stopped(result)
    summary: dict = {"output_dir": str(result.output_dir), "steps": result.step, "export": str(result.final_dir),
                     "skipped_steps": result.skipped_steps}
    if metrics.metrics is not None:
        summary["metrics"] = metrics.metrics
        summary["metrics_protocol"] = (f"{MIXTURE_SAMPLES} samples vs the true mixture; SW2 (256 projections), "
                                       "energy distance")
        (result.output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    elif result.final_dir is not None and trainer.accelerator.is_main_process:
        summary.update(miniature_metrics(result.final_dir, result.output_dir, result.step))
    return summary


def miniature_metrics(final_dir: Path, output_dir: Path, steps: int) -> dict:
    """The demo's metrics of a student of a miniature teacher (prompt accuracy, FID vs the teacher's 50-step
    samples and vs real images, images/s; `stepdistill eval --preset WORLD` measures the same), printed as the
    demo's table and written to metrics.json; {} for a student of any other teacher."""
    from stepdistill.config.preflight import recorded_teacher
    from stepdistill.evaluation.command import pipeline_world

    world = pipeline_world(final_dir)
    if world is None:
        return {}
    from stepdistill.evaluation.miniature import EVAL_SEED, evaluate_student, load_reference, markdown_table

    teacher_dir = recorded_teacher(final_dir)
    logger.info("measuring the student on the %s world (%d samples per class, as the demo)", world,
                MINIATURE_PER_CLASS)
    measured = evaluate_student(final_dir, world, MINIATURE_PER_CLASS, EVAL_SEED, teacher_dir=teacher_dir)
    row = {k: v for k, v in measured.items() if k not in ("teacher", "pipeline", "floors")}
    print(markdown_table({f"student ({final_dir})": row}, load_reference(world, teacher_dir),
                         real=f"real test {world}"), file=sys.stderr, flush=True)
    out = {"steps": steps, "metrics": row, "floors": measured["floors"],
           "metrics_protocol": (f"{world} world: {MINIATURE_PER_CLASS} samples per class (seed {EVAL_SEED}), prompt "
                                f"accuracy and FID on the {world} classifier's features vs the teacher's 50-step "
                                f"samples and vs real test images, as `stepdistill eval --preset {world}`")}
    (output_dir / "metrics.json").write_text(json.dumps({"output_dir": str(output_dir), "export": str(final_dir),
                                                         **out}, indent=2))
    return {k: v for k, v in out.items() if k != "steps"}


def say_skipped(stages: list[dict]) -> None:
    """One line per recipe stage that a rerun skipped because it had finished with the same config."""
    for stage in stages:
        if stage.get("skipped"):
            logger.info("stage %s had finished in %s with this config: skipped (train.overwrite=true trains it "
                        "again)", stage["stage"], stage.get("output_dir"))


def finish_recipe(tree: dict, stages: list[dict]) -> dict:
    """A recipe run's summary: each finished stage it skipped said in a line, and the demo's metrics of the last
    stage's export when its teacher is a miniature one."""
    say_skipped(stages)
    summary: dict = {"stages": stages}
    last = stages[-1] if stages else {}
    if last.get("export") and not last.get("interrupted"):
        from accelerate import PartialState

        if PartialState().is_main_process:
            final = Path(last["export"])
            summary.update(miniature_metrics(final, final.parent, int(last.get("steps") or 0)))
    return summary
