"""Command line: stepdistill demo | train | export | sample."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).parent / "assets" / "configs" / "demo.yaml"


def _train(config: str | None, overrides: list[str]) -> dict:
    from stepdistill.config import load_config
    from stepdistill.teachers.gmm import GMMTeacher
    from stepdistill.training import Trainer

    cfg = load_config(config, overrides)
    if getattr(cfg.objective, "stages", None):  # a progressive schedule: one run per stage
        from stepdistill.stages import run_stages

        return {"stages": [{"output_dir": str(r.output_dir), "steps": r.step, "export": str(r.final_dir)}
                           for r in run_stages(cfg)]}
    trainer = Trainer(cfg)
    result = trainer.train()
    if result.interrupted:
        raise Interrupted(result)
    summary: dict = {"output_dir": str(result.output_dir), "steps": result.step, "export": str(result.final_dir),
                     "skipped_steps": result.skipped_steps}
    generator = trainer.generator_for_inference()
    if isinstance(generator.teacher, GMMTeacher) and trainer.accelerator.is_main_process:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="distill a student: stepdistill train --config FILE [section.key=value ...]")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("demo", help="the offline default job (no download): distill the embedded teacher")
    p.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            summary = _train(args.config, args.overrides)
        elif args.command == "demo":
            summary = _train(str(DEMO_CONFIG), args.overrides)
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
