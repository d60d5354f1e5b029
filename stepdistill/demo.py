"""`stepdistill demo`: distill the shipped digits teacher into a one-step student with DMD2, export it as a
diffusers pipeline folder, and write the sample grid and the metrics table (teacher 50-step, teacher 1-step,
student 1-step: digits FID, prompt accuracy, images/s)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from stepdistill import digits

DEMO_CONFIG = digits.ASSETS / "configs" / "demo.yaml"
PROMPTS_FILE = digits.ASSETS / "configs" / "digits_prompts.txt"
EVAL_PER_DIGIT = 50
EVAL_SEED = 2000


def asset_overrides() -> list[str]:
    """The shipped teacher and prompts as absolute paths, so the demo runs from any working directory."""
    return [f"teacher.path={digits.TEACHER_DIR}", f"data.prompts_file={PROMPTS_FILE}"]


def run_distillation(config: str | Path, overrides: list[str]):
    from stepdistill.config import load_config
    from stepdistill.training import Trainer

    cfg = load_config(config, asset_overrides() + list(overrides))
    result = Trainer(cfg).train()
    return cfg, result


def markdown_table(metrics: dict, reference: dict, extra_columns: dict[str, str] | None = None) -> str:
    """The digits metrics table of the demo and the benchmark; `extra_columns` maps a header to a metrics key."""
    extra = extra_columns or {}
    lines = ["| model | steps | CFG | prompt accuracy | FID vs teacher 50-step | FID vs real test digits | images/s |"
             + "".join(f" {header} |" for header in extra),
             "|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    for name, m in metrics.items():
        lines.append(f"| {name} | {m['steps']} | {m['guidance_scale']:g} | {m['prompt_accuracy']:.3f} | "
                     f"{m['fid_vs_teacher50']:.2f} | {m['fid_vs_real']:.2f} | {m['images_per_s']:.1f} |"
                     + "".join(f" {m.get(key, '')} |" for key in extra.values()))
    lines.append(f"| floors | | | | {float(reference['teacher_floor']):.2f} (teacher vs teacher, other seeds) | "
                 f"{float(reference['real_floor']):.2f} (real train vs real test) | |" + " |" * len(extra))
    return "\n".join(lines)


def run_demo(overrides: list[str], config: str | Path = DEMO_CONFIG, per_digit: int = EVAL_PER_DIGIT) -> dict:
    from stepdistill.metrics.digits import REFERENCE_NAME, TEACHER_GUIDANCE, digits_reference, evaluate_digits
    from stepdistill.pipelines import load_exported
    from stepdistill.visualize import image_grid

    start = time.perf_counter()
    cfg, result = run_distillation(config, overrides)
    if result.interrupted:
        raise RuntimeError(f"interrupted at step {result.step}; continue with train.resume=latest")
    train_seconds = time.perf_counter() - start
    out = Path(cfg.train.output_dir)
    print("stepdistill demo: evaluating teacher (50 and 1 steps) and student (1 step)", flush=True)
    teacher = digits.load_digits_pipeline(cfg.teacher.path)
    student, recipe = load_exported(result.final_dir)
    student.set_progress_bar_config(disable=True)
    reference = digits_reference(teacher, Path(cfg.teacher.path) / REFERENCE_NAME)  # computed once, then cached
    kwargs = {k: v for k, v in recipe["pipeline_kwargs"].items()
              if k not in ("guidance_scale", "num_inference_steps")}
    rows = {"teacher 1-step DDIM": (teacher, 1, TEACHER_GUIDANCE, {}),
            "student 1-step (DMD2)": (student, recipe["num_inference_steps"], recipe["guidance_scale"], kwargs)}
    # the teacher's 50-step row: accuracy and FIDs of its cached second reference set (other seeds, the floor),
    # speed and grid images from a small batch (50 steps on the CPU are the slow part this demo avoids)
    m50, im50 = evaluate_digits(teacher, reference, 50, TEACHER_GUIDANCE, 2, EVAL_SEED)
    m50.update(num_samples=int(reference["num_samples"]), prompt_accuracy=float(reference["teacher_accuracy"]),
               fid_vs_teacher50=float(reference["teacher_floor"]), fid_vs_real=float(reference["teacher_vs_real"]))
    metrics, images = {"teacher 50-step DDIM": m50}, {"teacher 50-step DDIM": im50}
    for name, (pipe, steps, guidance, pipe_kwargs) in rows.items():
        metrics[name], images[name] = evaluate_digits(pipe, reference, steps, guidance, per_digit, EVAL_SEED,
                                                      **pipe_kwargs)
    grid = torch.cat([images[name][:20] for name in metrics])
    image_grid(grid, out / "samples.png", columns=20)
    table = markdown_table(metrics, reference)
    summary = {"output_dir": str(out), "export": str(result.final_dir), "train_seconds": round(train_seconds, 1),
               "total_seconds": round(time.perf_counter() - start, 1), "metrics": metrics,
               "floors": {"fid_teacher_vs_teacher": float(reference["teacher_floor"]),
                          "fid_real_vs_real": float(reference["real_floor"])},
               "protocol": {"feature_model": "digits classifier (64 pre-activation features)",
                            "fid_reference": f"teacher 50-step DDIM CFG {TEACHER_GUIDANCE}, "
                                             f"{int(reference['num_samples'])} samples, seed {int(reference['seed'])}",
                            "real_reference": "sklearn digits test split (25%, stratified, random_state 0)",
                            "samples_per_row": {n: m["num_samples"] for n, m in metrics.items()},
                            "teacher_50_step_row": "accuracy and FIDs of the cached second teacher set (seed + 1); "
                                                   "images/s from 20 images",
                            "prompts": "a handwritten digit <name>, balanced over the 10 digits",
                            "seed": EVAL_SEED, "images_per_s": "one batch of all the row's samples, wall time"}}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "metrics.md").write_text(table + "\n")
    print(table, flush=True)
    return summary
