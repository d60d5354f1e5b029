"""PG-SB's steadiness on the analytic teacher, where a metric has no sampling noise worth the name: one-step VSD
students (configs/vsd_gmm.yaml) of the class-conditional ring (4 classes, critic null dropout 0.1) trained with a
fixed guidance scale kappa on both scores and with SNOOPI's kappa ~ U(low, high) of the same mean, drawn once per
iteration; every `every` generator updates from `start`, SW2 and mode TV of 4096 samples against the teacher's
200-step samples at w = kappa's mean (the analogue of the digits bench's "FID vs the teacher") and at w = 1 (the
unguided teacher, the fixed point of the same-kappa gradient). The spread (max - min) over those evaluations per
run is issue 17's measure. Writes <out>/pgsb_gmm.json and <out>/pgsb_gmm.md.

    python eval/pgsb_gmm.py --out runs/pgsb_gmm --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from stepdistill.evaluation.distribution import evaluate_generator
from stepdistill.training.lean import build, optimize

CONFIG = "configs/vsd_gmm.yaml"
GUIDED = ["teacher.num_classes=4", "objective.critic_null_prob=0.1"]
BATCH = 128


def references(mean_kappa: float) -> tuple[torch.Tensor, dict[float, torch.Tensor]]:
    """Fixed class labels and the teacher's 200-step samples at w = 1 and w = mean_kappa from fixed noise."""
    teacher = build(CONFIG, GUIDED).teacher
    g = torch.Generator().manual_seed(3)
    labels = teacher.sample_conditions(4096, generator=g)
    noise = torch.randn(4096, 2, generator=g)
    return labels, {w: teacher.sample(noise, teacher.encode(labels), 200, guidance=w) for w in (1.0, mean_kappa)}


def run(overrides: list[str], seed: int, steps: int, every: int, start: int, labels, refs) -> dict:
    objective = build(CONFIG, [*GUIDED, *overrides], seed=seed)
    series = {w: {"sw2": [], "mode_tv": []} for w in refs}

    def evaluate(done: int) -> None:
        if done >= start and done % every == 0:
            for w, ref in refs.items():
                report = evaluate_generator(objective.generator, seed=1, labels=labels, reference=ref)
                series[w]["sw2"].append(report.sw2)
                series[w]["mode_tv"].append(report.mode_tv)

    optimize(objective, steps, BATCH, seed=seed, after_step=evaluate)
    return {f"w={w:g}": {**s, "sw2_spread": max(s["sw2"]) - min(s["sw2"]), "sw2_mean": statistics.fmean(s["sw2"]),
                         "sw2_sd": statistics.pstdev(s["sw2"]), "tv_spread": max(s["mode_tv"]) - min(s["mode_tv"])}
            for w, s in series.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/pgsb_gmm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fixed", type=float, default=2.0)
    parser.add_argument("--range", type=float, nargs=2, default=[1.0, 3.0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--start", type=int, default=1000)
    args = parser.parse_args()
    if abs(sum(args.range) / 2 - args.fixed) > 1e-9:
        parser.error(f"--range {args.range} must have the mean of --fixed {args.fixed}")
    torch.set_num_threads(1)
    begin = time.perf_counter()
    labels, refs = references(args.fixed)
    settings = {f"fixed {args.fixed:g}": [f"objective.real_guidance={args.fixed}"],
                f"U({args.range[0]:g}, {args.range[1]:g}) per iteration": [
                    f"objective.real_guidance_range=[{args.range[0]},{args.range[1]}]",
                    "objective.real_guidance_draw=batch"]}
    results = {}
    for seed in args.seeds:
        for name, overrides in settings.items():
            results[f"{name} / seed {seed}"] = run(overrides, seed, args.steps, args.every, args.start, labels, refs)
            print(name, seed, json.dumps({w: [round(r["sw2_spread"], 4), round(r["sw2_mean"], 4)]
                                          for w, r in results[f"{name} / seed {seed}"].items()}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pgsb_gmm.json").write_text(json.dumps({"results": results, "command": " ".join(sys.argv),
                                                   "seconds": round(time.perf_counter() - begin, 1)}, indent=2))
    kappa = f"w={args.fixed:g}"
    header = (f"| guidance / seed | SW2 vs teacher {kappa}: spread | mean | sd | mode TV spread | SW2 vs teacher w=1: "
              "spread | mean |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r[kappa]['sw2_spread']:.4f} | {r[kappa]['sw2_mean']:.4f} | {r[kappa]['sw2_sd']:.4f} | "
                     f"{r[kappa]['tv_spread']:.3f} | {r['w=1']['sw2_spread']:.4f} | {r['w=1']['sw2_mean']:.4f} |")
    (out / "pgsb_gmm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
