"""GMM numbers of docs/CONSISTENCY.md: an LCM (or MCD) student of the 8-ring GMM teacher at 1/2/4 steps against
the teacher's own DDIM at 1/2/4/200 steps, 4096 samples, one CPU thread.

    python eval/consistency_gmm.py [--steps 6000] [--segments 1] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from gmm_harness import build, optimize

from stepdistill.metrics.distribution import evaluate_against_mixture, evaluate_generator
from stepdistill.objectives.consistency import lcm_timesteps
from stepdistill.students import RenoiseGenerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--segments", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    objective = build("configs/consistency_gmm.yaml", [f"objective.num_segments={args.segments}"], args.seed)
    teacher = objective.teacher
    g = torch.Generator().manual_seed(0)
    labels = teacher.sample_conditions(4096, generator=g)
    noise = torch.randn(4096, 2, generator=g)
    for n in (1, 2, 4, 200):
        x = teacher.sample(noise, teacher.encode(labels), n)
        print(f"teacher DDIM {n:3d} steps: {evaluate_against_mixture(x, teacher.mixture, seed=0)}")
    optimize(objective, args.steps, 256, args.seed)
    student = objective.generator
    for n in (1, 2, 4) if args.segments == 1 else (args.segments,):
        sampler = RenoiseGenerator(student.backbone, teacher, lcm_timesteps(objective.grid, n), student.schedule,
                                   student.prediction_type) \
            if args.segments == 1 else student
        print(f"student {n} steps (S={args.segments}): {evaluate_generator(sampler, n=4096, seed=0, num_steps=n)}")


if __name__ == "__main__":
    main()
