"""Checkpoints: accelerate's save_state into a temporary folder renamed into place (a crash leaves at most a
temporary folder, which resume skips and the next save removes), the trainer state beside it, pruning of old ones,
and finding the one to resume from."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

from stepdistill.io import refuse_pickle

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-" + CHECKPOINT_PREFIX
STATE_FILE = "trainer_state.json"
OBJECTIVE_STATE = "objective_module_{}.safetensors"  # modules an objective keeps outside its optimizers


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts once it was renamed into place with its state file)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders whose write was interrupted (temporary folders, or no state file)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and (p.name.startswith(TMP_PREFIX) or not (p / STATE_FILE).is_file()))


def find_resume_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint `train.resume` names: a folder, or with "latest" the newest complete one (None if none)."""
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"train.resume: {path} is not a complete checkpoint (no {STATE_FILE}); "
                                    "use train.resume=latest or a checkpoint-N folder")
        return path
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def begin_checkpoint(output_dir: Path, step: int) -> Path:
    """Remove interrupted writes and return the temporary folder of a new checkpoint at `step` (main process)."""
    for stale in incomplete_checkpoints(output_dir):
        shutil.rmtree(stale, ignore_errors=True)
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{TMP_PREFIX}{step}"


def write_trainer_state(tmp: Path, state: dict) -> None:
    """The trainer's own state (step, skipped steps): the last file of a checkpoint, which marks it complete."""
    (tmp / STATE_FILE).write_text(json.dumps(state))


def finish_checkpoint(tmp: Path, step: int, keep: int) -> Path:
    """Rename a written checkpoint into place and prune to the `keep` newest (main process)."""
    final = tmp.with_name(f"{CHECKPOINT_PREFIX}{step}")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_accelerate_state(accelerator, path: Path) -> dict:
    """Restore what accelerate saved (weights, optimizers, schedulers, RNG); pickles are loaded tensors-only.
    Returns the trainer state (step, skipped steps)."""
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as e:
        raise refuse_pickle(path, e) from e
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"train.resume: {path} does not fit this run's model or optimizers "
                         f"({str(e).splitlines()[0]}); resume with the config that wrote it") from e
    return json.loads((path / STATE_FILE).read_text())
