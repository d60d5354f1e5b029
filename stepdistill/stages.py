"""Progressive segment schedules (MLCM's progressive training, Hyper-SD's TSCD 8 -> 4 -> 2 -> 1): one config
whose `objective.stages` lists the stages; each stage trains with its own objective overrides (e.g.
num_segments) and max_steps in `<output_dir>/stage-<i>-s<S>`, starting from the previous stage's final weights.

    stepdistill train --config configs/tscd_sd15.yaml [section.key=value ...]   (or python -m stepdistill.stages)
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import load_file, save_file

from stepdistill.config import Config, build_dataclass, load_config
from stepdistill.training import Trainer, TrainResult, build_objective

STAGE_WEIGHTS = "student_weights.safetensors"


def stage_configs(cfg: Config) -> list[Config]:
    """One validated config per stage: objective overrides applied, stages cleared, own output folder."""
    if not getattr(cfg.objective, "stages", None):
        raise ValueError("objective.stages is empty: list the stages, e.g. [{num_segments: 8, max_steps: 1000}, ...]")
    out = []
    for i, stage in enumerate(cfg.objective.stages):
        stage = dict(stage)
        max_steps = stage.pop("max_steps", cfg.train.max_steps)
        fields = {**dataclasses.asdict(cfg.objective), **stage, "stages": []}
        objective = build_dataclass(type(cfg.objective), fields, f"objective.stages[{i}].")
        segments = getattr(objective, "num_segments", 1)
        train = dataclasses.replace(cfg.train, max_steps=int(max_steps),
                                    output_dir=str(Path(cfg.train.output_dir) / f"stage-{i}-s{segments}"))
        out.append(dataclasses.replace(copy.deepcopy(cfg), objective=objective, train=train))
    return out


def run_stages(cfg: Config) -> list[TrainResult]:
    """Train the stages in order; a stage whose weights file exists is done and only hands its weights on."""
    results, state = [], None
    for stage_cfg in stage_configs(cfg):
        weights = Path(stage_cfg.train.output_dir) / STAGE_WEIGHTS
        if weights.is_file() and not stage_cfg.train.overwrite:
            state = load_file(str(weights))
            continue
        objective = build_objective(stage_cfg, PartialState().device)  # the device the Trainer's accelerator uses
        if state is not None:
            objective.load_student_state(state)
        trainer = Trainer(stage_cfg, objective)
        results.append(trainer.train())
        backbone = trainer.generator_for_inference().backbone
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
        if trainer.accelerator.is_main_process:
            save_file(state, str(weights))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepdistill.stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        results = run_stages(load_config(args.config, args.overrides))
    except (ValueError, FileNotFoundError) as e:
        print(f"stepdistill.stages: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps([{"output_dir": str(r.output_dir), "steps": r.step, "export": str(r.final_dir)}
                      for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
