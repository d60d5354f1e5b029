"""GMM numbers of docs/MSD.md: K one-step DMD2 students, one per contiguous class range, each at batch B, against one
student at batch K x B with the same number of generator updates (the paper's "4 students at batch 32 beat 1 at
batch 128"), on the 8-class overlapping ring at guidance 3 (configs/msd_gmm.yaml). Reference: the teacher's 200-step
CFG samples; 4096 samples with the same labels; SW2 and the mode TV of (label, nearest mode) histograms. Also a
router that sends every class to the next student (a deliberate defect). One CPU thread.

    python eval/msd_gmm.py [--seeds 0 1 2] [--steps 1000] [--batch 32] [--parts 4] [--overrides key=value ...]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from stepdistill.config import PartitionConfig
from stepdistill.data.partition import ClassRanges, restrict_to_part
from stepdistill.evaluation.distribution import evaluate_generator
from stepdistill.pipelines.routed import RoutedGenerator
from stepdistill.training.lean import build, optimize

CONFIG = "msd_gmm"  # the preset
GUIDANCE = 3.0


class NextStudent(ClassRanges):
    """Defect: every class goes to the student of the next part."""

    def route(self, cond):
        return (super().route(cond) + 1) % self.num_parts


def reference(overrides: list[str], n: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform labels and the teacher's 200-step DDIM samples at CFG 3."""
    teacher = build(CONFIG, overrides).teacher
    g = torch.Generator().manual_seed(3)
    labels = teacher.sample_conditions(n, generator=g)
    x = teacher.sample(torch.randn(n, *teacher.sample_shape, generator=g), teacher.encode(labels), 200, GUIDANCE)
    return labels, x


def train_students(parts: int, batch: int, steps: int, seed: int, overrides: list[str]
                   ) -> tuple[RoutedGenerator, list[list[int]]]:
    """One DMD2 student per part of the classes (its own critic and seed), as the MSD recipe's fan-out trains them;
    also the classes each student trained on."""
    generators, classes, partition = [], [], None
    with tempfile.TemporaryDirectory() as folder:
        for k in range(parts):
            objective = build(CONFIG, overrides, seed=seed * 1000 + k)
            partition = restrict_to_part(objective.source, PartitionConfig(parts=parts, part=k), folder)
            classes.append(list(objective.source.train_indices))
            generators.append(optimize(objective, steps, batch, seed=seed * 1000 + k).generator)
    return RoutedGenerator(generators, partition), classes


def train_single(batch: int, steps: int, seed: int, overrides: list[str]):
    return optimize(build(CONFIG, overrides, seed=seed * 1000), steps, batch, seed=seed * 1000).generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000, help="training steps (2 per generator update)")
    parser.add_argument("--batch", type=int, default=32, help="batch of each of the K students")
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    labels, x_ref = reference(args.overrides)
    rows = []
    for seed in args.seeds:
        start = time.process_time()
        routed, _ = train_students(args.parts, args.batch, args.steps, seed, args.overrides)
        msd_cpu = time.process_time() - start
        start = time.process_time()
        single = train_single(args.parts * args.batch, args.steps, seed, args.overrides)
        single_cpu = time.process_time() - start
        wrong = RoutedGenerator(list(routed.generators), NextStudent(args.parts, routed.partition.tensors))
        row = {"seed": seed, "msd_cpu_s": round(msd_cpu, 1), "single_cpu_s": round(single_cpu, 1)}
        for name, generator in (("msd", routed), ("single", single), ("wrong_router", wrong)):
            report = evaluate_generator(generator, seed=1, labels=labels, reference=x_ref)
            row[name] = {"sw2": round(report.sw2, 4), "mode_tv": round(report.mode_tv, 4),
                         "precision": round(report.precision, 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    for name in ("msd", "single", "wrong_router"):
        for metric in ("sw2", "mode_tv"):
            values = torch.tensor([r[name][metric] for r in rows])
            print(f"{name:12s} {metric:7s} mean {values.mean():.4f} min {values.min():.4f} max {values.max():.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
