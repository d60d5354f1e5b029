"""Shared helpers of the reliability tests: a tiny run config, trainers built in-process, bitwise comparison."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate.utils import load as accelerate_load
from accelerate.utils import set_seed
from safetensors.torch import load_file

from stepdistill.config import Config, config_from_dict
from stepdistill.data import ConditionSource
from stepdistill.students import build_student
from stepdistill.teachers import load_teacher
from stepdistill.training import Trainer


def tiny_tree(output_dir: Path, **train) -> dict:
    """256 cached pairs, batch 32: 8 steps per epoch, so 12 steps cross an epoch boundary."""
    return {
        "objective": {"name": "regression", "lr": 1e-2, "num_pairs": 256, "teacher_steps": 4},
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
    teacher = load_teacher(cfg.teacher)
    generator = build_student(teacher, cfg.student)
    return Trainer(cfg, objective_class(teacher, generator, ConditionSource(teacher), cfg.objective))


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
