"""GMM numbers of docs/CONSISTENCY.md: an LCM (or MCD) student of the 8-ring GMM teacher, trained by the Trainer on
the shipped preset (batch 256, constant learning rate), at 1/2/4 steps against the teacher's own DDIM at 1/2/4/200
steps, 4096 samples, one CPU thread.

    python eval/consistency_gmm.py [--steps 6000] [--segments 1] [--seed 0] [--out runs/consistency_gmm_eval]
"""
from __future__ import annotations

import argparse

import torch

from stepdistill.config import load_config
from stepdistill.evaluation.distribution import evaluate_against_mixture, evaluate_generator
from stepdistill.objectives.consistency import lcm_timesteps
from stepdistill.students import RenoiseGenerator
from stepdistill.training import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--segments", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/consistency_gmm_eval")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("consistency_gmm", [
        f"objective.num_segments={args.segments}", f"train.max_steps={args.steps}", "train.batch_size=256",
        f"train.seed={args.seed}", "train.lr_scheduler=constant", f"train.output_dir={args.out}",
        "train.overwrite=true", "train.progress=false", "train.report_to=none", "train.device_threads=1"])
    trainer = Trainer(cfg)
    objective = trainer.objective
    teacher = objective.teacher
    g = torch.Generator().manual_seed(0)
    labels = teacher.sample_conditions(4096, generator=g)
    noise = torch.randn(4096, 2, generator=g)
    for n in (1, 2, 4, 200):
        x = teacher.sample(noise, teacher.encode(labels), n)
        print(f"teacher DDIM {n:3d} steps: {evaluate_against_mixture(x, teacher.mixture, seed=0)}")
    trainer.train()
    student = trainer.generator_for_inference()
    for n in (1, 2, 4) if args.segments == 1 else (args.segments,):
        sampler = student if args.segments > 1 else RenoiseGenerator(
            student.backbone, teacher, lcm_timesteps(objective.grid, n), student.schedule, student.prediction_type)
        print(f"student {n} steps (S={args.segments}): {evaluate_generator(sampler, n=4096, seed=0, num_steps=n)}")


if __name__ == "__main__":
    main()
