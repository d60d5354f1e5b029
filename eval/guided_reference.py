"""Which of the teacher's guided distributions does a one-step export match? FID (on the miniature world's classifier
features) of each export against the teacher's 50-step samples at several CFG scales, and against the real test
split. An objective whose fixed point is the unguided teacher (VSD with the same guidance on both scores) lands
near CFG 1, one that targets the guided score (DMD2) near the reference's CFG; the teacher's own samples at each
scale are scored against the real digits too. Writes <out>/guided_reference.json and .md.

    python eval/guided_reference.py runs/sweeps/score_digits/pgsb_centre/seed0/final --out runs/guided_reference
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from stepdistill.evaluation.fid import frechet_distance, statistics
from stepdistill.evaluation.miniature import (
    EVAL_SEED,
    REFERENCE_SEED,
    features,
    load_reference,
    recipe_sampling,
    sampling_kwargs,
)
from stepdistill.miniature import DATASETS, get_dataset
from stepdistill.miniature.classifier import ClassifierFeatures
from stepdistill.miniature.dataset import sample_pipeline
from stepdistill.pipelines import load_exported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="exported pipeline folders")
    parser.add_argument("--out", default="runs/guided_reference")
    parser.add_argument("--world", default="digits", choices=list(DATASETS))
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0], help="the teacher's CFG")
    parser.add_argument("--per-class", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = get_dataset(args.world)
    model = ClassifierFeatures(dataset.classifier_dir)
    labels = dataset.balanced_labels(args.per_class)
    real = load_reference(dataset)
    real_stats = (real["real_mu"], real["real_sigma"])
    teacher, _ = load_exported(dataset.teacher_dir)
    refs = {w: statistics(features(sample_pipeline(teacher, dataset, labels, steps=50, guidance=w,
                                                   seed=REFERENCE_SEED), model)) for w in args.scales}
    rows = {f"teacher 50-step at CFG {w:g}": {"real": frechet_distance(*refs[w], *real_stats)} for w in args.scales}
    for folder in args.folders:
        pipe, recipe = load_exported(folder)
        steps, guidance = recipe_sampling(recipe, dataset)
        images = sample_pipeline(pipe, dataset, labels, steps=steps, guidance=guidance, seed=EVAL_SEED,
                                 **sampling_kwargs(recipe))
        stats = statistics(features(images, model))
        rows[folder] = {**{f"cfg {w:g}": frechet_distance(*stats, *refs[w]) for w in args.scales},
                        "real": frechet_distance(*stats, *real_stats)}
        print(folder, {k: round(v, 2) for k, v in rows[folder].items()}, flush=True)
    columns = [*(f"cfg {w:g}" for w in args.scales), "real"]
    lines = ["| model | " + " | ".join(f"vs teacher {c.upper()}" if c != "real" else "vs real" for c in columns)
             + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" if c in row else "" for c in columns) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "guided_reference.json").write_text(json.dumps({"world": args.world, "rows": rows}, indent=1))
    (out / "guided_reference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
