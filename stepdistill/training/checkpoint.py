"""Checkpoints: accelerate's save_state into a temporary folder renamed into place (a crash leaves at most a
temporary folder, which resume skips and the next save removes), the trainer state beside it with the hash of the
config that wrote it, pruning of this run's old ones, verification of their files, and finding the one to resume
from."""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

from stepdistill.config import ConfigError
from stepdistill.io import readable_by_all, refuse_pickle

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-" + CHECKPOINT_PREFIX
STATE_FILE = "trainer_state.json"
OBJECTIVE_STATE = "objective_module_{}.safetensors"  # modules an objective keeps outside its optimizers
# train keys a resumed run may change: where and how long it trains, how it reports, and how it computes (memory
# and speed options). The others (batch, seed, schedule, EMA, optimizer) and every other section define the run.
RESUMABLE_TRAIN_KEYS = ("output_dir", "max_steps", "resume", "overwrite", "log_every", "report_to", "progress",
                        "validate_every", "num_validation_samples", "checkpoint_every", "checkpoints_limit",
                        "device_threads", "mixed_precision", "gradient_checkpointing", "compile", "channels_last",
                        "attention", "nonfinite")


def run_identity(config_tree: dict) -> dict:
    """The part of a config (as config_to_dict gives it) that a checkpoint belongs to."""
    tree = {k: v for k, v in config_tree.items() if k != "recipe"}
    tree["train"] = {k: v for k, v in tree["train"].items() if k not in RESUMABLE_TRAIN_KEYS}
    return json.loads(json.dumps(tree, default=str))


def config_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'key: <saved> there, <current> here' for every dotted key whose value differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} here")
    return out


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts once it was renamed into place with its state file)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders whose write was interrupted (temporary folders, or no state file)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and (p.name.startswith(TMP_PREFIX) or not (p / STATE_FILE).is_file()))


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with a checkpoint's files (a truncated or unreadable one), or None when every file is whole:
    safetensors headers must cover their files, torch zip archives must pass their CRC checks."""
    from safetensors import safe_open

    try:
        read_state(path)
    except (OSError, ValueError) as e:
        return f"{STATE_FILE}: {e}"
    for f in sorted(Path(path).iterdir()):
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as handle:
                    handle.keys()
            elif f.suffix in (".bin", ".pkl", ".pt"):
                with zipfile.ZipFile(f) as archive:
                    if archive.testzip() is not None:
                        return f"{f.name}: a stored record fails its CRC check"
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type, zipfile BadZipFile/OSError
            return f"{f.name}: {str(e).splitlines()[0]}"
    return None


def find_resume_checkpoint(output_dir: Path, resume: str, warn: Callable[..., None]) -> Path | None:
    """The checkpoint `train.resume` names, verified: a folder; "latest", the newest one (refused, naming the
    newest intact one, if it is corrupt); "latest-valid", the newest intact one. None: nothing to resume."""
    if not resume:
        return None
    if resume not in ("latest", "latest-valid"):
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise ConfigError(f"train.resume: {path} is not a complete checkpoint (no {STATE_FILE}); use "
                              "train.resume=latest or a checkpoint-N folder")
        problem = verify_checkpoint(path)
        if problem:
            raise ConfigError(f"train.resume: {path} is corrupt ({problem}); resume from another checkpoint")
        return path
    found = list_checkpoints(output_dir)
    corrupt: list[str] = []
    for path in reversed(found):
        problem = verify_checkpoint(path)
        if problem is None:
            if corrupt and resume == "latest":
                raise ConfigError(f"train.resume=latest: the newest checkpoint {corrupt[0]}; {path} is intact: "
                                  "continue from it with train.resume=latest-valid")
            for line in corrupt:
                warn("train.resume=latest-valid: skipping corrupt checkpoint %s", line)
            return path
        corrupt.append(f"{path} is corrupt ({problem})")
    if corrupt:
        raise ConfigError(f"train.resume={resume}: every checkpoint in {Path(output_dir) / 'checkpoints'} is corrupt "
                          f"(newest: {corrupt[0]}); start afresh with train.overwrite=true")
    return None


def begin_checkpoint(output_dir: Path, step: int) -> Path:
    """Remove interrupted writes and return the temporary folder of a new checkpoint at `step` (main process)."""
    for stale in incomplete_checkpoints(output_dir):
        shutil.rmtree(stale, ignore_errors=True)
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{TMP_PREFIX}{step}"


def write_trainer_state(tmp: Path, state: dict) -> None:
    """The trainer's own state (step, skipped steps, config hash): the last file of a checkpoint, which marks it
    complete."""
    (tmp / STATE_FILE).write_text(json.dumps(state))


def finish_checkpoint(tmp: Path, step: int, keep: int, digest: str) -> Path:
    """Rename a written checkpoint into place and prune this run's checkpoints (same config hash, earlier steps)
    to the `keep` newest; checkpoints of another config are never removed (main process)."""
    readable_by_all(tmp)
    final = tmp.with_name(f"{CHECKPOINT_PREFIX}{step}")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    own = [p for p in list_checkpoints(final.parent.parent)
           if checkpoint_step(p) <= step and read_state(p).get("config_hash") == digest]
    for old in own[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_layout(path: Path, num_processes: int, sharded: bool) -> None:
    """Refuse a resume whose process count or sharding differs from the checkpoint's: FSDP shards are read back by
    torch.distributed.checkpoint whatever the count, but the learning-rate schedules advance once per process
    each step (accelerate's scheduler wrapper) and a one-process run reads whole-model files, so such a resume
    would not continue the same run. Checkpoints that record no layout are not checked."""
    state = read_state(path)
    saved_n, saved_sharded = state.get("num_processes"), state.get("sharded")
    if saved_n is None or (saved_n == num_processes and saved_sharded == sharded):
        return
    raise ConfigError(f"train.resume: {path} was written by {_layout(saved_n, saved_sharded)} and this run has "
                      f"{_layout(num_processes, sharded)}: resume with the launch that wrote it (accelerate launch "
                      f"--num_processes {saved_n}{' and the same FSDP config' if saved_sharded else ''}), or export "
                      f"it with `stepdistill export {path}`")


def _layout(num_processes: int, sharded: bool) -> str:
    return f"{num_processes} process{'es' if num_processes > 1 else ''}{' with FSDP (sharded)' if sharded else ''}"


def load_accelerate_state(accelerator, path: Path) -> dict:
    """Restore what accelerate saved (weights, optimizers, schedulers, RNG); pickles are loaded tensors-only.
    Returns the trainer state (step, skipped steps)."""
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as e:
        raise refuse_pickle(path, e) from e
    except (RuntimeError, KeyError) as e:
        raise ConfigError(f"train.resume: {path} does not fit this run's model or optimizers "
                          f"({str(e).splitlines()[0]}); resume with the config that wrote it") from e
    return read_state(path)
