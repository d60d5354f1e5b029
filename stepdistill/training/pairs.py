"""The `pairs` command: a config's teacher-pair step run ahead of training, its shards divided among the processes
that `accelerate launch` started. `train` on the same config then finds the finished cache (it is keyed by what
made it) and reuses it."""
from __future__ import annotations

import json
from pathlib import Path

from stepdistill.config import Config, ConfigError, config_to_dict
from stepdistill.data.pairs import PairProcesses, split_across
from stepdistill.io import write_atomic
from stepdistill.training.rundir import RUN_MARKER

CACHES = ("pairs", "pairs.partial")  # what a run folder may hold before its training starts


def check_output_dir(output_dir: Path) -> None:
    """Refuse a folder that holds something other than a stepdistill run or its pair cache (as `train` would)."""
    if not output_dir.is_dir() or (output_dir / RUN_MARKER).is_file():
        return
    other = sorted(p.name for p in output_dir.iterdir() if p.name not in CACHES)
    if other:
        raise ConfigError(f"train.output_dir {output_dir} is not empty and holds no stepdistill run "
                          f"({', '.join(other[:5])}): choose a new or empty folder for the run and its pairs")


def cache_pairs(cfg: Config, shard_size: int = 8192, batch_size: int = 1024) -> dict:
    """Generate the objective's teacher pairs on every launched process (each its share of the shards)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from stepdistill.objectives import build_objective
    from stepdistill.training.accel import close_process_group

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as the Accelerator reads it
    output_dir = Path(cfg.train.output_dir)
    check_output_dir(output_dir)
    objective = build_objective(cfg, state.device)
    processes = PairProcesses(state.process_index, state.num_processes, state.wait_for_everyone, shard_size,
                              batch_size)
    try:
        with split_across(processes):
            objective.prepare_data(str(output_dir), state.device)
        if not processes.made:
            raise ConfigError(f"objective {cfg.objective.name} caches no teacher pairs with these settings: nothing "
                              "to generate (`stepdistill train` runs it directly)")
        if state.is_main_process and not (output_dir / RUN_MARKER).is_file():
            output_dir.mkdir(parents=True, exist_ok=True)  # `train` continues in this folder
            write_atomic(output_dir / RUN_MARKER, json.dumps(config_to_dict(cfg), indent=2, default=str))
        state.wait_for_everyone()
    finally:
        close_process_group()
    return {"pairs": [str(p) for p in processes.made], "num_pairs": cfg.objective.pairs.num,
            "processes": processes.count, "shard_size": shard_size}
