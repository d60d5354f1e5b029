"""Is SNOOPI's PG-SB steadier than a fixed guidance scale? VSD (SwiftBrush) on the shipped digits teacher with a
fixed kappa and with kappa ~ U(low, high) of the same mean, the same seeds and budget; the raw student (its trained
weights; `--weights ema`: its EMA, what the run would export if stopped there) is exported at each of the last
evaluation steps and scored by `stepdistill eval --preset
digits` (FID vs the teacher's 50-step samples). The spread (max - min) of those FIDs per run is the measure (SNOOPI
v1 Fig. 2 shows SwiftBrush's FID oscillating with a fixed scale). Each run's final export (EMA weights, as the
preset trains) is scored too: with the presets' settings these are the digits benchmark's VSD and PG-SB rows.
FID vs the real digits is recorded at every evaluation as well (SNOOPI's own axis). Writes <out>/stability.json
and <out>/stability.md.

    python eval/pgsb_stability.py --out runs/pgsb_lr1e-4 --seeds 0 1            # the presets: fixed 2 vs U(1, 3)
    python eval/pgsb_stability.py --out runs/pgsb_lr1e-4_ema --weights ema --seeds 0 1 2
    python eval/pgsb_stability.py --out runs/pgsb_stability --fixed 3 --range 1 5 --set objective.generator_lr=1e-3
    python eval/pgsb_stability.py --out runs/pgsb_long --weights ema --steps 1000 --every 50 --last 10 \
        --set objective.real_guidance_draw=batch objective.generator_lr=3e-5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from stepdistill.config import load_config
from stepdistill.training import Hook, Trainer

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "stepdistill" / "assets"


class ExportAt(Hook):
    """Export the student (its raw weights, or its EMA) at the given training steps."""

    def __init__(self, steps: list[int], out: Path, ema: bool) -> None:
        self.steps, self.out, self.ema = set(steps), out, ema

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if trainer.step in self.steps:
            with trainer.inference_generator(ema=self.ema) as generator:
                trainer.objective.export(generator, self.out / f"step-{trainer.step:05d}")


def digits_fid(folder: Path, per_digit: int) -> dict:
    """`stepdistill eval <folder> --preset digits` in its own process; its metrics.json."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "stepdistill.cli", "eval", str(folder), "--preset", "digits",
                    "--num-samples", str(per_digit), "--out", str(folder / "eval-digits")],
                   check=True, env=env, capture_output=True)
    return json.loads((folder / "eval-digits" / "metrics.json").read_text())


def run(name: str, overrides: list[str], args, seed: int) -> dict:
    out = Path(args.out) / f"{name}-seed{seed}"
    steps = list(range(args.steps - args.every * (args.last - 1), args.steps + 1, args.every))
    cfg = load_config(args.config, [f"teacher.path={ASSETS / 'digits_teacher'}",
                                    f"data.prompts_file={ASSETS / 'configs' / 'digits_prompts.txt'}",
                                    f"train.output_dir={out}", f"train.max_steps={args.steps}", f"train.seed={seed}",
                                    "train.overwrite=true", "train.progress=false",
                                    *overrides])
    start = time.perf_counter()
    Trainer(cfg, hooks=[ExportAt(steps, out / "evals", args.weights == "ema")]).train()
    train_s = time.perf_counter() - start
    metrics = {s: digits_fid(out / "evals" / f"step-{s:05d}", args.per_digit) for s in steps}
    fids = {s: m["fid_vs_teacher50"] for s, m in metrics.items()}
    reals = {s: m["fid_vs_real"] for s, m in metrics.items()}
    values = list(fids.values())
    final = digits_fid(out / "final", args.per_digit)
    row = {"run": name, "seed": seed, "overrides": overrides, "weights": args.weights, "fid_by_step": fids,
           "spread": max(values) - min(values), "fid_vs_real_by_step": reals,
           "spread_vs_real": max(reals.values()) - min(reals.values()),
           "mean": sum(values) / len(values), "final_ema": {k: final[k] for k in ("prompt_accuracy", "fid_vs_teacher50",
                                                                                "fid_vs_real")},
           "train_seconds": round(train_s, 1)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/pgsb_stability")
    parser.add_argument("--config", default=str(ROOT / "stepdistill" / "presets" / "vsd_digits.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=300, help="training steps (VSD: generator updates)")
    parser.add_argument("--every", type=int, default=25, help="steps between evaluations")
    parser.add_argument("--last", type=int, default=6, help="evaluations at the end of each run")
    parser.add_argument("--fixed", type=float, default=2.0, help="the fixed guidance scale (vsd_digits')")
    parser.add_argument("--range", type=float, nargs=2, default=[1.0, 3.0],
                        help="PG-SB's U(low, high) (snoopi_digits')")
    parser.add_argument("--per-digit", type=int, default=50)
    parser.add_argument("--weights", choices=["raw", "ema"], default="raw",
                        help="what is exported at each evaluation: the trained weights or their EMA")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for both runs, e.g. objective.generator_lr=1e-4")
    args = parser.parse_args()
    if abs(sum(args.range) / 2 - args.fixed) > 1e-9:
        parser.error(f"--range {args.range} must have the mean of --fixed {args.fixed}")
    low, high = args.range
    settings = {f"fixed {args.fixed:g}": [*args.set, f"objective.real_guidance={args.fixed}"],
                f"U({low:g}, {high:g})": [*args.set, f"objective.real_guidance_range=[{low},{high}]"]}
    start = time.perf_counter()
    rows = [run(name, overrides, args, seed) for seed in args.seeds for name, overrides in settings.items()]
    report = {"rows": rows, "command": " ".join(sys.argv), "total_seconds": round(time.perf_counter() - start, 1)}
    Path(args.out, "stability.json").write_text(json.dumps(report, indent=2))
    lines = ["| guidance | seed | FID vs teacher at steps " + ", ".join(map(str, rows[0]["fid_by_step"]))
             + f" ({args.weights} weights) | spread (max - min) | mean | FID vs real at those steps | its spread"
             " | final EMA export: FID vs teacher / accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['seed']} | " + ", ".join(f"{v:.1f}" for v in r["fid_by_step"].values())
                     + f" | {r['spread']:.1f} | {r['mean']:.1f} | "
                     + ", ".join(f"{v:.1f}" for v in r["fid_vs_real_by_step"].values())
                     + f" | {r['spread_vs_real']:.1f} | {r['final_ema']['fid_vs_teacher50']:.1f} / "
                     f"{r['final_ema']['prompt_accuracy']:.3f} |")
    Path(args.out, "stability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
