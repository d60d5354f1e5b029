"""Command line: stepdistill demo | train | teacher | eval | plan | bench."""
from __future__ import annotations

import argparse
import json
import sys


def _train(config: str | None, overrides: list[str], only: list[str] | None = None) -> dict:
    from stepdistill.config import ConfigError, config_from_dict, load_config_tree
    from stepdistill.training import Trainer

    tree = load_config_tree(config, overrides)
    if tree.get("recipe"):  # a multi-stage run: one training per stage
        from stepdistill.recipes import run_recipe

        stages = run_recipe(tree, overwrite=bool((tree.get("train") or {}).get("overwrite", False)), only=only)
        return {"stages": stages}
    if only:
        raise ConfigError("--stage selects stages of a recipe, and this config has no recipe")
    cfg = config_from_dict(tree)
    trainer = Trainer(cfg)
    result = trainer.train()
    if result.interrupted:
        raise Interrupted(result)
    summary: dict = {"output_dir": str(result.output_dir), "steps": result.step, "export": str(result.final_dir),
                     "skipped_steps": result.skipped_steps}
    generator = trainer.generator_for_inference()
    if generator.teacher.mixture is not None and trainer.accelerator.is_main_process:
        from stepdistill.metrics.distribution import evaluate_generator

        summary["metrics"] = evaluate_generator(generator, n=4096, seed=cfg.train.seed).as_dict()
        summary["metrics_protocol"] = "4096 samples vs the true mixture; SW2 (256 projections), energy distance"
        (result.output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, result) -> None:
        super().__init__(f"stopped by signal {result.interrupted} at step {result.step} after saving a checkpoint; "
                         "continue with train.resume=latest")
        self.result = result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="distill a student: stepdistill train --config FILE|PRESET [section.key=value ...]")
    p.add_argument("--config", default=None, help="a YAML file or a preset name (default: the schema's defaults)")
    p.add_argument("--stage", dest="stages", action="append", default=None, metavar="NAME",
                   help="run only this stage of a recipe (repeatable; a fan-out's name: all its stages), e.g. one "
                        "launch per GPU group")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("teacher", help="train an offline teacher: stepdistill teacher digits [--seed 0]")
    p.add_argument("name", choices=["digits"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="teacher pipeline folder (default: the shipped asset)")
    p.add_argument("--classifier-out", default=None, help="digit classifier folder (default: the shipped asset)")
    p.add_argument("--vae-steps", type=int, default=200)
    p.add_argument("--unet-steps", type=int, default=1500)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--eval-per-digit", type=int, default=20, help="teacher samples per digit for its accuracy")
    p.add_argument("--reference-per-digit", type=int, default=50, help="50-step samples per digit, FID reference")
    p = sub.add_parser("demo", help="the offline default job (no download): DMD2 on the shipped digits teacher")
    p.add_argument("--eval-per-digit", type=int, default=50, help="evaluation samples per digit")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("eval", help="evaluate a pipeline folder: digits, coco2014-30k or coco2017-5k preset")
    p.add_argument("pipeline", help="a diffusers pipeline folder (an exported student or a teacher)")
    p.add_argument("--preset", default="digits", choices=["digits", "coco2014-30k", "coco2017-5k"])
    p.add_argument("--out", default=None, help="output folder (default: <pipeline>/eval-<preset>)")
    p.add_argument("--captions", help="COCO captions file (captions_val2014.json, or one caption per line)")
    p.add_argument("--reference", help="reference image folder for FID (e.g. val2014)")
    p.add_argument("--num-samples", type=int, help="overrides the preset's N (30000 / 5000; digits: per digit)")
    p.add_argument("--resolution", type=int, help="overrides the preset's eval resolution (256)")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help="sampling steps (default: the exported recipe's, else 50)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the exported recipe's, else the preset's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--clip-model", default=None, help="CLIP model: hub id or local folder")
    p.add_argument("--fid-backend", default="cleanfid", choices=["cleanfid", "torchmetrics"])
    p.add_argument("--fid-mode", default="clean", choices=["clean", "legacy_tensorflow", "legacy_pytorch"])
    p.add_argument("--feature", default="inception", choices=["inception", "digits"])
    p.add_argument("--inception-weights", default="", help="local Inception weights file (torchmetrics backend)")
    p.add_argument("--speed", action="store_true", help="also measure latency and throughput")
    p = sub.add_parser("plan", help="per-GPU memory estimate of a config and the options that make it fit")
    p.add_argument("--config", default=None, help="a YAML file or a preset name (default: the schema's defaults)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU, GiB")
    p.add_argument("--model", default=None, help="architecture: tiny-sd|tiny-sdxl|sd15|sdxl (default: teacher.kind)")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("bench", help="training-step and sampling speed: --preset tiny (CPU) | h100 (GPU)")
    p.add_argument("--preset", choices=["tiny", "h100"], default="tiny")
    p.add_argument("--out", default="runs/speed", help="folder for speed.json and speed.md")
    p.add_argument("--objectives", nargs="+", default=None, choices=["dmd2", "lcm", "regression"])
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from stepdistill.training.accel import close_process_group

            try:
                summary = _train(args.config, args.overrides, args.stages)
            finally:
                close_process_group()
        elif args.command == "teacher":
            from stepdistill import digits

            summary = digits.build_digits_teacher(
                args.out or digits.TEACHER_DIR, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                classifier_dir=args.classifier_out or digits.CLASSIFIER_DIR, device=args.device,
                eval_per_digit=args.eval_per_digit, reference_per_digit=args.reference_per_digit)
        elif args.command == "demo":
            from stepdistill.demo import run_demo

            summary = run_demo(args.overrides, per_digit=args.eval_per_digit)
        elif args.command == "eval":
            from stepdistill.evaluate import evaluate_cli

            summary = evaluate_cli(args)
        elif args.command == "plan":
            from stepdistill.config import load_config
            from stepdistill.perf.memory import plan

            summary = plan(load_config(args.config, args.overrides), args.gpu_gib, args.model)
        elif args.command == "bench":
            from stepdistill.perf.speed import run_and_write

            command = f"stepdistill bench --preset {args.preset} --out {args.out}" + \
                (f" --objectives {' '.join(args.objectives)}" if args.objectives else "")
            summary = run_and_write(args.preset, args.objectives, args.out, command)
        else:  # pragma: no cover - argparse restricts the choices
            parser.error(f"unknown command {args.command}")
    except Interrupted as e:
        print(f"stepdistill: {e}", file=sys.stderr)
        return 128 + e.result.interrupted
    except (ValueError, FileNotFoundError) as e:
        print(f"stepdistill: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
