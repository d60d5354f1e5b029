"""A miniature world's metrics of pipeline folders at several evaluation seeds, beside the teacher at 50 and 4 steps.

`stepdistill eval --preset digits` scores one seed (2000) with 500 samples; on the digits classifier's features such
an FID moves by several points with the sampling seed alone (the teacher's own 50-step samples: 6.1 to 12.5 vs its
reference, 53 to 77 vs the real digits). Close calls (a student against the teacher's 4-step samples) are read here
from the mean over seeds and seed by seed: every folder at a seed gets the same prompts and noise, so the per-seed
differences are paired. Writes <out>/seeds.json and <out>/seeds.md.

    python eval/eval_seeds.py runs/a/final runs/b/final --out runs/eval_seeds [--world digits] [--seeds 2000 2001]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from stepdistill.evaluation.miniature import (
    evaluate_pipeline,
    load_reference,
    recipe_sampling,
    sampling_kwargs,
)
from stepdistill.miniature import DATASETS, MiniatureDataset, get_dataset
from stepdistill.miniature.classifier import ClassifierFeatures
from stepdistill.pipelines import load_exported

METRICS = ("fid_vs_teacher50", "fid_vs_real", "prompt_accuracy")


def score(folder: str, dataset: MiniatureDataset, reference: dict, model: ClassifierFeatures, seeds: list[int],
          per_class: int, steps: int | None = None) -> dict[str, list]:
    """Each metric of METRICS at each seed, as `stepdistill eval` scores the folder (its recipe's steps and CFG)."""
    pipe, recipe = load_exported(folder)
    steps, guidance = recipe_sampling(recipe, dataset, steps)
    runs = [evaluate_pipeline(pipe, dataset, reference, steps, guidance, per_class, s, model,
                              **sampling_kwargs(recipe))[0] for s in seeds]
    return {k: [m[k] for m in runs] for k in METRICS}


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(rows: dict[str, dict[str, list]], seeds: list[int], anchor: str) -> str:
    """Mean +- sd per metric, each seed's FID vs the teacher, and the paired mean difference from `anchor`."""
    header = (f"| model | FID vs teacher 50-step | per seed ({', '.join(map(str, seeds))}) | minus {anchor}, "
              "paired | FID vs real | prompt accuracy |")
    lines = [header, "|---|---|---|---|---|---|"]
    base = rows[anchor]["fid_vs_teacher50"]
    for name, r in rows.items():
        paired = statistics.mean(a - b for a, b in zip(r["fid_vs_teacher50"], base))
        per_seed = " / ".join(f"{v:.2f}" for v in r["fid_vs_teacher50"])
        lines.append(f"| {name} | {mean_sd(r['fid_vs_teacher50'])} | {per_seed} | {paired:+.2f} | "
                     f"{mean_sd(r['fid_vs_real'])} | {statistics.mean(r['prompt_accuracy']):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="exported pipeline folders (students or teachers)")
    parser.add_argument("--out", default="runs/eval_seeds")
    parser.add_argument("--world", default="digits", choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[2000, 2001, 2002, 2003, 2004])
    parser.add_argument("--per-class", type=int, default=50, help="samples per class at each seed (the eval's 50)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = get_dataset(args.world)
    reference, model = load_reference(dataset), ClassifierFeatures(dataset.classifier_dir)
    common = (dataset, reference, model, args.seeds, args.per_class)
    rows = {"teacher 50-step": score(str(dataset.teacher_dir), *common, steps=50),
            "teacher 4-step": score(str(dataset.teacher_dir), *common, steps=4)}
    for folder in args.folders:
        rows[folder] = score(folder, *common)
        print(folder, {k: round(statistics.mean(v), 3) for k, v in rows[folder].items()}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps({"world": args.world, "seeds": args.seeds, "rows": rows}, indent=1))
    markdown = table(rows, args.seeds, "teacher 4-step")
    (out / "seeds.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
