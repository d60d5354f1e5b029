"""The run folder: refused when it holds something else or a run nobody asked to continue or replace, or when
another process trains into it (an advisory lock held while a command trains); for `train.overwrite` the old run
is moved aside in one atomic rename and kept (the pair cache comes back, since it is keyed by everything that made
it)."""
from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stepdistill.config import ConfigError
from stepdistill.config.preflight import check_resume_path
from stepdistill.training.checkpoint import incomplete_checkpoints, list_checkpoints

RUN_MARKER = "config.json"
REUSABLE = ("pairs",)  # caches keyed by what made them, which a replacing run may reuse
LOCK_FILE = ".stepdistill.lock"
_held: dict[Path, int] = {}  # run folders this process trains into -> the open lock file's descriptor


def holds_work(output_dir: Path) -> bool:
    """Whether the folder holds trained state: checkpoints (complete or not) or an export."""
    return bool(list_checkpoints(output_dir) or incomplete_checkpoints(output_dir) or (output_dir / "final").exists())


def check_run_dir(train_cfg, output_dir: Path) -> None:
    """Refuse, before any work, a folder that holds something other than a stepdistill run, or a run that the
    config neither resumes nor replaces."""
    if train_cfg.overwrite and train_cfg.resume:
        raise ConfigError(f"train.overwrite=true and train.resume={train_cfg.resume} ask for opposite things: keep "
                          "train.resume to continue the run in train.output_dir, or train.overwrite to start afresh")
    check_resume_path(train_cfg)
    if train_cfg.overwrite:
        here = Path.cwd().resolve()
        if output_dir.resolve() in (here, *here.parents):
            raise ConfigError(f"train.output_dir {output_dir} is the working folder (or holds it), which "
                              "train.overwrite=true would move aside under your shell: choose a subfolder, e.g. "
                              "train.output_dir=runs/my_run")
    if not output_dir.is_dir() or train_cfg.overwrite:
        return
    entries = sorted(p.name for p in output_dir.iterdir() if p.name != LOCK_FILE)
    if entries and not (output_dir / RUN_MARKER).is_file() and not (output_dir / "checkpoints").is_dir():
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"train.output_dir {output_dir} is not empty and holds no stepdistill run ({shown}): "
                          "choose a new or empty folder, or set train.overwrite=true to move its contents aside")
    if holds_work(output_dir) and not train_cfg.resume:
        raise ConfigError(f"train.output_dir {output_dir} already holds a run: set train.resume=latest to continue "
                          "it, train.overwrite=true to replace it (it is moved aside, not deleted), or choose "
                          "another output_dir")


@contextmanager
def locked_run_dir(output_dir: str | Path) -> Iterator[None]:
    """Hold the run folder's advisory lock (fcntl.flock on `<output_dir>/.stepdistill.lock`) while the block
    trains, or refuse when another process holds it: two runs writing one folder corrupt each other's checkpoints
    and pair cache. A folder created for the lock and left empty (a run refused before any work) is removed again.
    Only the main process of a launch locks (torchrun and `accelerate launch` set RANK); the kernel releases the
    lock however the process ends."""
    key = Path(output_dir).resolve()
    if key in _held or os.environ.get("RANK", "0") != "0":
        yield
        return
    created = not key.exists()
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"train.output_dir {output_dir} is in use by another training process (it holds "
                          f"{LOCK_FILE}): wait for it to finish, or choose another train.output_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd
    try:
        yield
    finally:
        del _held[key]
        (key / LOCK_FILE).unlink(missing_ok=True)
        os.close(fd)
        if created and key.is_dir() and not any(key.iterdir()):
            key.rmdir()


def move_aside(output_dir: Path) -> Path | None:
    """Rename a non-empty run folder to `<name>.replaced-<time>` beside it and start an empty one holding the old
    reusable caches (and this process's lock file, so the new run stays locked); returns where the old run went
    (None: there was nothing to move)."""
    output_dir = output_dir.resolve()  # `runs/x/..` or `.` name no folder to rename
    if not output_dir.is_dir() or not any(p.name != LOCK_FILE for p in output_dir.iterdir()):
        return None
    stem = f"{output_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = output_dir.with_name(stem), 1
    while aside.exists():
        aside, n = output_dir.with_name(f"{stem}-{n}"), n + 1
    os.rename(output_dir, aside)
    output_dir.mkdir()
    for name in (*REUSABLE, LOCK_FILE):
        if (aside / name).exists() and (name != LOCK_FILE or output_dir in _held):
            os.rename(aside / name, output_dir / name)  # a renamed lock file stays locked
    return aside
