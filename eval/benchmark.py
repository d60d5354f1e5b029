"""The digits benchmark: every landed objective distills the shipped digits teacher into a one-step student with the
same budget (generator updates and batch) and seeds, then all are scored like the demo (prompt accuracy, digits
FID vs the teacher's 50-step samples and vs real test digits, images/s) next to the teacher at 1 and 4 DDIM steps.
Writes <out>/benchmark.json, <out>/benchmark.md and, with --markdown, the digits section of that file.

    python eval/benchmark.py --out runs/benchmark --markdown BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import yaml

from stepdistill.evaluation.miniature import (
    evaluate_pipeline,
    evaluate_student,
    load_reference,
    markdown_table,
)
from stepdistill.miniature import get_dataset
from stepdistill.miniature.dataset import ASSETS
from stepdistill.miniature.demo import EVAL_SEED, asset_overrides, run_distillation
from stepdistill.miniature.teacher import load_teacher

DIGITS = get_dataset("digits")
TEACHER_GUIDANCE = DIGITS.guidance

# DMD2 from the teacher's weights (the demo before issue 12): the DMD2 row and the base of every single-stage row
DMD2_CONFIG = ASSETS / "configs" / "dmd2_digits.yaml"
DEMO_OBJECTIVE = yaml.safe_load(DMD2_CONFIG.read_text())["objective"]
PRESETS = Path(__file__).resolve().parents[1] / "stepdistill" / "presets"


def preset_objective(name: str) -> dict:
    """The objective section of a shipped digits preset (its train section is the demo's)."""
    return yaml.safe_load((PRESETS / f"{name}.yaml").read_text())["objective"]


# Each method's objective section; everything else (teacher, student = a copy of its UNet at t = 999, batch 32,
# seed) is the demo's. Teacher-sample methods use the teacher at the reference's CFG scale 3 (LCM form: omega 2).
METHODS: dict[str, dict] = {
    "regression (DMD L_reg / rectified-flow distillation)": {
        "name": "regression", "lr": 5e-4, "pairs": {"num": 1000, "steps": 20, "guidance": TEACHER_GUIDANCE},
        "loss": "l2"},
    "consistency (LCM, data-free)": {
        "name": "consistency", "lr": 5e-4, "data": "teacher",
        "pairs": {"num": 1000, "steps": 20, "guidance": TEACHER_GUIDANCE}, "w_min": TEACHER_GUIDANCE - 1,
        "w_max": TEACHER_GUIDANCE - 1, "loss": "l2"},
    "DMD2 (no GAN)": DEMO_OBJECTIVE,
    "DMD2 + GAN on real digits": {**DEMO_OBJECTIVE, "real_data": "images", "gan_generator_weight": 3e-3,
                                  "gan_critic_weight": 1e-2},
    # the demo (issue 12): DMD2 §4's one-step warm start, regression on teacher pairs then DMD2 from that student
    "DMD2 warm start (the demo)": {"recipe": "dmd2_warm_digits", "rows": {"regression": (1,), "dmd2": (1,)}},
    "BOOT (data-free, signal ODE)": {"name": "boot", "lr": 1e-3, "guidance": TEACHER_GUIDANCE, "step_size": 20.0},
    "VSD (SwiftBrush)": preset_objective("vsd_digits"),
    "VSD + PG-SB random guidance (SNOOPI)": preset_objective("snoopi_digits"),
    "SiD (LSG guidance)": preset_objective("sid_digits"),
    # multi-stage methods: a shipped recipe with its own steps, and the stages (and sampling steps) to evaluate
    "reflow (InstaFlow: 2-RF, then distilled)": {"recipe": "reflow_digits",
                                                 "rows": {"rf2": (1, 2, 4), "distill": (1,)}},
    "SlimFlow (half-size UNet)": {"recipe": "slimflow_digits", "rows": {"anneal": (1,), "fgd": (1,)}},
}
# Student settings a method needs beyond the demo's: BOOT's student reads pure noise and samples at t = 0.
METHOD_STUDENTS: dict[str, dict] = {"BOOT (data-free, signal ODE)": {"timesteps": [0], "prediction_type": "sample"}}
TSM_STEPS = 1000  # teacher score matching of the half-width student, before its DMD2 stage


def msd(parts: int, same_total: bool):
    """Multi-student distillation (docs/MSD.md): one demo DMD2 student per part of the ten prompts, then the routed
    export; the method's generator updates are split over the students (`same_total`) or given to each."""
    def tree(updates: int, real: Path) -> dict:
        per_student = updates // parts if same_total else updates
        return {"data": {"partition": {"parts": parts}},
                "train": {"max_steps": per_student * DEMO_OBJECTIVE["critic_updates"]},
                "recipe": [{"name": "student", "for_each": {"data.partition.part": list(range(parts))}},
                           {"name": "routed", "route": "student"}]}
    return tree


def half_width(tsm: bool):
    """A student of half the teacher's channel widths (random init), distilled by the demo's DMD2, after a teacher
    score matching stage on the real train digits (MSD §3.3) or without it."""
    def tree(updates: int, real: Path) -> dict:
        dmd2 = {"name": "dmd2", "set": {"objective": dict(DEMO_OBJECTIVE),
                                         "train.max_steps": updates * DEMO_OBJECTIVE["critic_updates"]}}
        if not tsm:
            return {"student": {"kind": "smaller", "width": 0.5}, "recipe": [dmd2]}
        dmd2["set"]["student.init"] = "${stages.tsm.final}"
        return {"student": {"kind": "smaller", "width": 0.5}, "data": {"image_dir": str(real)},
                "recipe": [{"name": "tsm", "set": {"objective": {"name": "score_matching", "lr": 1e-3,
                                                                 "data": "images"},
                                                   "train.max_steps": TSM_STEPS}}, dmd2]}
    return tree


# Rows trained by a recipe over the demo config: name -> tree(generator updates, real digits folder) to overlay.
RECIPES = {
    "MSD, 2 students (DMD2, same total updates)": msd(2, same_total=True),
    "MSD, 5 students (DMD2, same total updates)": msd(5, same_total=True),
    "MSD, 2 students (DMD2, same updates each)": msd(2, same_total=False),
    "half-width student, DMD2 (no TSM)": half_width(tsm=False),
    "half-width student, TSM then DMD2": half_width(tsm=True),
}
SECTION_START, SECTION_END = "<!-- digits-benchmark:start -->", "<!-- digits-benchmark:end -->"


def method_config(name: str, out: Path, real: Path) -> Path:
    """The demo config with this method's objective section, written to <out>/configs/ (it is what ran)."""
    tree = yaml.safe_load(DMD2_CONFIG.read_text())
    tree["objective"] = dict(METHODS[name])
    tree["student"] = {**tree["student"], **METHOD_STUDENTS.get(name, {})}
    if tree["objective"].get("real_data") == "images":
        tree.setdefault("data", {})["image_dir"] = str(real)
    path = out / "configs" / f"{slug(name)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def recipe_tree(name: str, out: Path, real: Path, updates: int) -> dict:
    """The demo config with a RECIPES row's sections laid over it; its stages train in <out>/<slug>/."""
    from stepdistill.config import load_config_tree

    tree = load_config_tree(DMD2_CONFIG, asset_overrides() + [f"train.output_dir={out / slug(name)}",
                                                              "train.seed=0"])
    for section, values in RECIPES[name](updates, real).items():
        tree[section] = {**tree.get(section, {}), **values} if isinstance(values, dict) else values
    return tree


def run_recipe_method(name: str, out: Path, real: Path, updates: int) -> tuple[Path, int]:
    """Train a RECIPES row; returns its last stage's export and its training steps."""
    from stepdistill.recipes import run_recipe

    stages = run_recipe(recipe_tree(name, out, real, updates))
    if stages[-1].get("interrupted"):
        raise SystemExit(f"{name}: stage {stages[-1]['stage']} stopped at step {stages[-1]['steps']}; run the same "
                         "command to continue it")
    return Path(stages[-1]["export"]), sum(stage.get("steps", 0) for stage in stages)


def run_preset_recipe(name: str, out: Path, reference: dict, per_digit: int) -> dict[str, dict]:
    """Run a recipe method's preset on the shipped teacher and evaluate its listed stages at their step counts; the
    last row carries the whole recipe's training time and steps."""
    from stepdistill.config import load_config_tree
    from stepdistill.miniature.demo import asset_overrides
    from stepdistill.pipelines import load_exported, sampling_kwargs
    from stepdistill.recipes import run_recipe

    method = METHODS[name]
    folder = out / slug(name)
    tree = load_config_tree(method["recipe"], [*asset_overrides(), f"train.output_dir={folder}", "train.seed=0"])
    start = time.perf_counter()
    results = run_recipe(tree)
    seconds = time.perf_counter() - start
    rows = {}
    for stage, step_counts in method["rows"].items():
        pipe, recipe = load_exported(folder / stage / "final")
        pipe.set_progress_bar_config(disable=True)
        for steps in step_counts:
            row = f"{name}: {stage}" + (f", {steps} Euler steps" if recipe["sampling"]["any_num_steps"] else "")
            rows[row], _ = evaluate_pipeline(pipe, DIGITS, reference, steps, recipe["guidance_scale"], per_digit,
                                             EVAL_SEED, **sampling_kwargs(recipe))
            print(row, json.dumps(rows[row]), flush=True)
    rows[row].update(train_seconds=round(seconds, 1), train_steps=sum(r["steps"] for r in results))
    return rows


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:40]


def write_section(markdown: Path, section: str) -> None:
    """Replace the digits section of `markdown` (between the markers), or append it; the rest is kept."""
    block = f"{SECTION_START}\n{section.strip()}\n{SECTION_END}"
    text = markdown.read_text() if markdown.is_file() else "# Benchmarks\n"
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        text = head + block + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    markdown.write_text(text)


def merged_rows(previous: dict, new: dict) -> dict:
    """`previous` rows (an earlier run's benchmark.json) updated by `new`, teachers first, then the methods in the
    order of METHODS and RECIPES: a run of a few `--methods` keeps the other rows of the table."""
    rows = {**previous, **new}
    order = [name for name in rows if name.startswith("teacher ")] + [*METHODS, *RECIPES]
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(rows.items(), key=lambda item: rank.get(method_of(item[0]), len(rank))))


def method_of(row: str) -> str:
    """The method a table row belongs to: a preset recipe's rows are named "<method>: <stage>..."."""
    return next((m for m in (*METHODS, *RECIPES) if row == m or row.startswith(m + ": ")), row)


def write_report(out: Path, rows: dict, reference: dict, generator_steps: int, seconds: float) -> dict:
    """<out>/benchmark.json, rewritten after every method so a stopped run keeps the rows it finished."""
    report = {"rows": rows, "floors": {"fid_teacher_vs_teacher": float(reference["teacher_floor"]),
                                       "fid_real_vs_real": float(reference["real_floor"])},
              "generator_steps": generator_steps, "cpu_cores": os.cpu_count(), "total_seconds": round(seconds, 1)}
    (out / "benchmark.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/benchmark")
    parser.add_argument("--generator-steps", type=int, default=150, help="generator updates per method")
    parser.add_argument("--per-digit", type=int, default=50, help="evaluation samples per digit and row")
    parser.add_argument("--markdown", default="", help="also write the table into this file's digits section")
    parser.add_argument("--methods", nargs="*", default=[*METHODS, *RECIPES], choices=[*METHODS, *RECIPES],
                        help="the methods to run; the rows of the others are kept from <out>/benchmark.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    previous_seconds = 0.0
    previous = {}
    if (out / "benchmark.json").is_file():
        earlier = json.loads((out / "benchmark.json").read_text())
        if earlier["generator_steps"] != args.generator_steps:
            raise SystemExit(f"{out / 'benchmark.json'} holds rows of {earlier['generator_steps']} generator updates, "
                             f"not {args.generator_steps}: pass --generator-steps {earlier['generator_steps']} or "
                             "another --out")
        previous, previous_seconds = earlier["rows"], earlier["total_seconds"]
        previous = {name: row for name, row in previous.items() if method_of(name) not in args.methods}
    teacher = load_teacher(DIGITS)
    reference = load_reference(DIGITS)
    rows = {}
    for steps in (1, 4):
        rows[f"teacher {steps}-step DDIM"], _ = evaluate_pipeline(teacher, DIGITS, reference, steps, TEACHER_GUIDANCE,
                                                                  args.per_digit, EVAL_SEED)
    report = write_report(out, merged_rows(previous, rows), reference, args.generator_steps, previous_seconds)
    real = DIGITS.write_image_folder(out / "real_digits", "train")  # the GAN's real data, captioned by prompts
    for name in args.methods:
        if "recipe" in METHODS.get(name, {}):
            rows.update(run_preset_recipe(name, out, reference, args.per_digit))
        else:
            run_start, cpu_start = time.perf_counter(), time.process_time()
            if name in RECIPES:
                final_dir, train_steps = run_recipe_method(name, out, real, args.generator_steps)
            else:
                # a method that updates its critic several times per generator update gets that many more steps
                train_steps = args.generator_steps * int(METHODS[name].get("critic_updates", 1))
                _, final_dir = run_distillation(method_config(name, out, real), [
                    f"train.max_steps={train_steps}", f"train.output_dir={out / slug(name)}", "train.seed=0"])
            seconds, cpu_seconds = time.perf_counter() - run_start, time.process_time() - cpu_start
            rows[name] = evaluate_student(final_dir, DIGITS, args.per_digit, EVAL_SEED)
            rows[name].update(train_seconds=round(seconds, 1), train_cpu_seconds=round(cpu_seconds, 1),
                              train_steps=train_steps)
            print(name, json.dumps(rows[name]), flush=True)
        report = write_report(out, merged_rows(previous, rows), reference, args.generator_steps,
                              previous_seconds + time.perf_counter() - start)
    columns = {"train steps": "train_steps", "train s": "train_seconds", "train CPU s": "train_cpu_seconds"}
    table = markdown_table(report["rows"], reference, columns)
    (out / "benchmark.md").write_text(table + "\n")
    print(table)
    if args.markdown:
        command = f"python eval/benchmark.py --out {args.out} --generator-steps {args.generator_steps} " \
                  f"--per-digit {args.per_digit} --markdown {args.markdown}"
        write_section(Path(args.markdown), (
            "## Digits: one-step students of the shipped digits teacher\n\n"
            f"`{command}` (CPU, {report['cpu_cores']} cores, {report['total_seconds'] / 60:.1f} min in all). Same "
            "teacher, student init (a copy of its UNet at t = 999), batch 32, seed and "
            f"{args.generator_steps} generator updates per method (each method's config is written to "
            f"`{args.out}/configs/`); {10 * args.per_digit} samples per row from the same prompts and seeds, "
            "balanced over the digits; digits FID on the classifier's 64 pre-activation features.\n\n" + table))


if __name__ == "__main__":
    main()
