"""The JVP's cost: seconds per training iteration of sCD (a forward-mode JVP through the student, plus the forward
with gradient and the guided teacher) against LCM (teacher solver step, EMA target, student) on the same tiny SD1.x
UNet, same batch, same device, through the objectives' own phases (stepdistill/training/lean.py).

    python eval/scd_cost.py [--batch 4] [--iters 20] [--device cpu|cuda] [--out runs/scd_cost]

Prints a markdown table and writes <out>/scd_cost.json."""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from stepdistill.config import load_config
from stepdistill.objectives import build_objective
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training.lean import optimize

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUNS = {"scd": "scd_sd15.yaml", "lcm": "lcm_sd15.yaml"}


def seconds_per_iteration(preset: str, teacher: Path, work: Path, batch: int, iters: int, device: str) -> float:
    cfg = load_config(CONFIGS / preset, [f"teacher.path={teacher}", f"train.output_dir={work}", "teacher.dtype=fp32",
                                         "objective.pairs.num=64", "objective.pairs.steps=2"])
    torch.manual_seed(0)
    objective = build_objective(cfg, device)
    objective.prepare_data(str(work), device)
    optimize(objective, 2, batch)  # warm-up: allocations, kernel selection
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimize(objective, iters, batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/scd_cost")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = save_tiny_pipeline("sd", Path(tmp) / "tiny_sd")
        result = {name: seconds_per_iteration(preset, teacher, Path(tmp) / name, args.batch, args.iters, args.device)
                  for name, preset in RUNS.items()}
    result.update(batch=args.batch, iters=args.iters, device=args.device,
                  gpu=torch.cuda.get_device_name() if args.device == "cuda" else "",
                  ratio=result["scd"] / result["lcm"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scd_cost.json").write_text(json.dumps(result, indent=2))
    print(f"| objective | s / iteration (tiny SD1.x UNet, batch {args.batch}, {args.device}) |\n|---|---|\n"
          f"| LCM | {result['lcm']:.4f} |\n| sCD | {result['scd']:.4f} |\n| sCD / LCM | {result['ratio']:.2f} |")


if __name__ == "__main__":
    main()
