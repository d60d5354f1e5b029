"""`stepdistill demo`: distill a shipped miniature teacher (digits by default, or shapes) into a one-step
student with DMD2 warm-started from a regression student (presets/dmd2_warm_digits.yaml), export it as a diffusers
pipeline folder, and write the sample grid and the metrics table (teacher 50-step, teacher 1-step, student 1-step:
classifier FID, prompt accuracy, images/s)."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from torch import Tensor

from stepdistill.evaluation.miniature import (
    EVAL_SEED,
    evaluate_pipeline,
    evaluate_student,
    floors,
    load_reference,
    markdown_table,
)
from stepdistill.miniature import MiniatureDataset, get_dataset
from stepdistill.miniature.dataset import sample_pipeline
from stepdistill.miniature.teacher import load_teacher
from stepdistill.pipelines import load_exported, sampling_kwargs

logger = logging.getLogger(__name__)
DEMO_CONFIG = "dmd2_warm_digits"  # a preset: regression on teacher pairs, then DMD2 from that student
DEMO_OUTPUT = "runs/demo"
EVAL_PER_CLASS = 50


def asset_overrides(teacher: str | MiniatureDataset = "digits") -> list[str]:
    """The shipped teacher and its prompts as absolute paths, so the demo runs from any working directory."""
    dataset = get_dataset(teacher)
    return [f"teacher.path={dataset.teacher_dir}", f"data.prompts_file={dataset.prompts_file}"]


def run_distillation(config: str | Path, overrides: list[str],
                     teacher: str | MiniatureDataset = "digits") -> tuple[dict, Path]:
    """Train a config or a recipe on a shipped teacher; returns its config tree and the (last stage's) export."""
    from stepdistill.config import config_from_dict, load_config_tree
    from stepdistill.recipes import train_recipe
    from stepdistill.training import Trainer
    from stepdistill.training.run import raise_if_stopped, say_skipped
    from stepdistill.training.rundir import locked_run_dir

    tree = load_config_tree(config, asset_overrides(teacher) + list(overrides))
    with locked_run_dir((tree.get("train") or {}).get("output_dir", DEMO_OUTPUT)):
        if tree.get("recipe"):
            stages = train_recipe(tree)
            say_skipped(stages)
            return tree, Path(stages[-1]["export"])
        result = Trainer(config_from_dict(tree)).train()
    raise_if_stopped(result)
    return tree, result.final_dir


def samples_grid(rows: dict[str, Tensor], dataset: MiniatureDataset, labels: Tensor, path: Path) -> Path:
    """The demo's samples.png: a row per sampler (named), a column per prompt (its text on top)."""
    from stepdistill.visualize import labelled_rows

    return labelled_rows(rows, path, column_labels=[dataset.prompts[int(c)] for c in labels])


def run_demo(overrides: list[str], config: str | Path = DEMO_CONFIG, per_class: int = EVAL_PER_CLASS,
             teacher: str | MiniatureDataset = "digits") -> dict:
    dataset = get_dataset(teacher)
    start = time.perf_counter()
    tree, final_dir = run_distillation(config, [f"train.output_dir={DEMO_OUTPUT}", *overrides], dataset)
    train_seconds = time.perf_counter() - start
    out = Path(tree["train"]["output_dir"])
    teacher_dir = tree["teacher"]["path"]
    logger.info("evaluating the %s teacher (50 and 1 steps) and student (1 step)", dataset.name)
    teacher_pipe = load_teacher(dataset, teacher_dir)
    reference = load_reference(dataset, teacher_dir)  # computed once, then cached in the teacher's folder
    # the teacher's 50-step row: accuracy and FIDs of its cached second reference set (other seeds, the floor),
    # speed and grid images from a small batch (50 steps on the CPU are the slow part this demo avoids)
    m50, im50 = evaluate_pipeline(teacher_pipe, dataset, reference, 50, dataset.guidance, 2, EVAL_SEED)
    m50.update(num_samples=int(reference["num_samples"]), prompt_accuracy=float(reference["teacher_accuracy"]),
               fid_vs_teacher50=float(reference["teacher_floor"]), fid_vs_real=float(reference["teacher_vs_real"]))
    m1, im1 = evaluate_pipeline(teacher_pipe, dataset, reference, 1, dataset.guidance, per_class, EVAL_SEED)
    student = evaluate_student(final_dir, dataset, per_class, EVAL_SEED, teacher_dir=teacher_dir)
    metrics = {"teacher 50-step DDIM": m50, "teacher 1-step DDIM": m1,
               "student 1-step (DMD2)": {k: v for k, v in student.items() if k not in ("teacher", "pipeline", "floors")}}
    grid_labels = dataset.balanced_labels(1)  # one column per prompt
    student_pipe, recipe = load_exported(final_dir)
    student_images = sample_pipeline(student_pipe, dataset, grid_labels, recipe["num_inference_steps"],
                                     recipe["guidance_scale"], EVAL_SEED, **sampling_kwargs(recipe))
    n = len(grid_labels)
    samples_grid({"teacher 50 steps": im50[:n], "teacher 1 step": im1[:n],
                  f"student {recipe['num_inference_steps']} step": student_images}, dataset, grid_labels,
                 out / "samples.png")
    table = markdown_table(metrics, reference, real=f"real test {dataset.name}")
    summary = {"teacher": dataset.name, "output_dir": str(out), "export": str(final_dir),
               "train_seconds": round(train_seconds, 1), "total_seconds": round(time.perf_counter() - start, 1),
               "metrics": metrics, "floors": floors(reference),
               "protocol": {"feature_model": f"{dataset.name} classifier (64 pre-activation features)",
                            "fid_reference": f"teacher 50-step DDIM CFG {dataset.guidance:g}, "
                                             f"{int(reference['num_samples'])} samples, seed {int(reference['seed'])}",
                            "real_reference": dataset.real_description,
                            "samples_per_row": {n: m["num_samples"] for n, m in metrics.items()},
                            "teacher_50_step_row": "accuracy and FIDs of the cached second teacher set (seed + 1); "
                                                   f"images/s from {2 * dataset.num_classes} images",
                            "prompts": f"'{dataset.prompts[0]}' and the like, balanced over the "
                                       f"{dataset.num_classes} classes",
                            "seed": EVAL_SEED, "images_per_s": "one batch of all the row's samples, wall time"}}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "metrics.md").write_text(table + "\n")
    print(table, file=sys.stderr, flush=True)  # stdout carries only --json
    return summary

