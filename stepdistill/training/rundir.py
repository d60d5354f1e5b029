"""The run folder: refused when it holds something else or a run nobody asked to continue or replace; for
`train.overwrite` the old run is moved aside in one atomic rename and kept (the pair cache comes back, since it is
keyed by everything that made it)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from stepdistill.config import ConfigError
from stepdistill.training.checkpoint import incomplete_checkpoints, list_checkpoints

RUN_MARKER = "config.json"
REUSABLE = ("pairs",)  # caches keyed by what made them, which a replacing run may reuse


def holds_work(output_dir: Path) -> bool:
    """Whether the folder holds trained state: checkpoints (complete or not) or an export."""
    return bool(list_checkpoints(output_dir) or incomplete_checkpoints(output_dir) or (output_dir / "final").exists())


def check_run_dir(train_cfg, output_dir: Path) -> None:
    """Refuse, before any work, a folder that holds something other than a stepdistill run, or a run that the
    config neither resumes nor replaces."""
    if train_cfg.overwrite and train_cfg.resume:
        raise ConfigError(f"train.overwrite=true and train.resume={train_cfg.resume} ask for opposite things: keep "
                          "train.resume to continue the run in train.output_dir, or train.overwrite to start afresh")
    if not output_dir.is_dir() or train_cfg.overwrite:
        return
    entries = sorted(p.name for p in output_dir.iterdir())
    if entries and not (output_dir / RUN_MARKER).is_file() and not (output_dir / "checkpoints").is_dir():
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"train.output_dir {output_dir} is not empty and holds no stepdistill run ({shown}): "
                          "choose a new or empty folder, or set train.overwrite=true to move its contents aside")
    if holds_work(output_dir) and not train_cfg.resume:
        raise ConfigError(f"train.output_dir {output_dir} already holds a run: set train.resume=latest to continue "
                          "it, train.overwrite=true to replace it (it is moved aside, not deleted), or choose "
                          "another output_dir")


def move_aside(output_dir: Path) -> Path | None:
    """Rename a non-empty run folder to `<name>.replaced-<time>` beside it and start an empty one holding the old
    reusable caches; returns where the old run went (None: there was nothing to move)."""
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return None
    stem = f"{output_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = output_dir.with_name(stem), 1
    while aside.exists():
        aside, n = output_dir.with_name(f"{stem}-{n}"), n + 1
    os.rename(output_dir, aside)
    output_dir.mkdir()
    for name in REUSABLE:
        if (aside / name).is_dir():
            os.rename(aside / name, output_dir / name)
    return aside
