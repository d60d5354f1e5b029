"""Shared helpers of the reliability tests: a tiny run config, trainers built in-process, bitwise comparison."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate.utils import load as accelerate_load
from accelerate.utils import set_seed
from safetensors.torch import load_file

from stepdistill.config import Config, config_from_dict
from stepdistill.objectives import build_objective
from stepdistill.training import DEFAULT_HOOKS, Hook, Trainer


def tiny_tree(output_dir: Path, **train) -> dict:
    """256 cached pairs, batch 32: 8 steps per epoch, so 12 steps cross an epoch boundary."""
    return {
        "objective": {"name": "regression", "lr": 1e-2, "pairs": {"num": 256, "steps": 4}},
        "teacher": {"kind": "gmm", "num_modes": 4, "backbone_hidden": 32, "backbone_depth": 2},
        "student": {"kind": "copy", "timesteps": [999], "prediction_type": "sample"},
        "train": {"output_dir": str(output_dir), "max_steps": 12, "batch_size": 32, "checkpoint_every": 5,
                  "checkpoints_limit": 3, "log_every": 1, "report_to": "none", "num_validation_samples": 16,
                  "ema_decay": 0.9, "lr_scheduler": "cosine", "lr_warmup_steps": 3, "progress": False,
                  "device_threads": 1, **train},
    }


def write_config(tree: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def make_trainer(cfg: Config | dict, objective_class=None) -> Trainer:
    """A Trainer whose objective is `objective_class` (built as the CLI builds it: seeded, then student)."""
    cfg = config_from_dict(cfg) if isinstance(cfg, dict) else cfg
    if objective_class is None:
        return Trainer(cfg)
    set_seed(cfg.train.seed)
    built = build_objective(cfg)  # the config's teacher, conditions and student, as the CLI builds them
    return Trainer(cfg, objective_class(built.teacher, built.generator, built.source, cfg.objective, cfg.data))


def checkpoint_state(folder: Path) -> dict:
    """Everything a checkpoint holds: weights, optimizer, scheduler, EMA, RNG states, trainer state."""
    out = {}
    for f in sorted(folder.iterdir()):
        if f.suffix == ".safetensors":
            out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
        elif f.suffix in (".bin", ".pkl"):
            out[f.name] = accelerate_load(str(f))
        elif f.suffix == ".json":
            out[f.name] = json.loads(f.read_text())
    return out


def assert_same(a, b, where: str = "") -> None:
    """Bitwise equality of nested states (tensors, numpy arrays, containers, scalars)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {where}"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"differs at {where}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {where}: {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"differs at {where}: {a!r} != {b!r}"


def checkpoint_steps(output_dir: Path) -> list[int]:
    root = Path(output_dir) / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("checkpoint-*"))


PAUSE_ENV = "STEPDISTILL_TEST_PAUSE"  # <where>:<step>, read by the launcher below


class PauseAt(Hook):
    """A test hook: at <where>:<step> ("step" after a training step, "save" between a checkpoint's write and its
    rename) the main process creates <output_dir>/paused and waits up to 60 s for a stop signal, so a test can
    interrupt or SIGKILL the run at that exact point."""

    def __init__(self, spec: str) -> None:
        where, step = spec.split(":")
        self.where, self.at = where, int(step)

    def _pause(self, trainer, where: str) -> None:
        if where != self.where or trainer.step != self.at or not trainer.accelerator.is_main_process:
            return
        (trainer.output_dir / "paused").touch()
        deadline = time.monotonic() + 60
        while not trainer.stop_requested and time.monotonic() < deadline:
            time.sleep(0.02)

    def on_step_end(self, trainer, logs) -> None:
        self._pause(trainer, "step")

    def on_checkpoint_written(self, trainer, folder) -> None:
        self._pause(trainer, "save")


def cli_with_pause() -> int:
    """`stepdistill` with a PauseAt hook from $STEPDISTILL_TEST_PAUSE registered on every trainer."""
    import os
    import sys

    from stepdistill.cli import main

    DEFAULT_HOOKS.append(lambda: PauseAt(os.environ[PAUSE_ENV]))
    return main(sys.argv[1:])
