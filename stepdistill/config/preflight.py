"""Checks of a run's settings against the machine, before any work and without a model: the output folder can be
created and written, the precision suits the device, the tracker is installed."""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

from stepdistill.config.schema import ConfigError

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_output_dir(value: str, key: str = "train.output_dir") -> Path:
    """The output folder as a Path; refused when empty (the run would land in the working directory), a file, or
    inside a folder that cannot be written (read-only, no permission)."""
    if not value.strip():
        raise ConfigError(f"{key} is empty: give a folder for the run, e.g. {key}=runs/my_run")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key} {path} is a file, not a folder: choose another {key}")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key} {path}: {existing} is a file, so the folder cannot be created there; choose "
                          f"another {key}")
    try:  # an actual write: permission bits do not show a read-only file system, nor stop root
        with tempfile.TemporaryDirectory(dir=existing, prefix=".stepdistill-write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"{key} {path}: {existing} cannot be written ({e.strerror}); choose a writable "
                          f"folder") from e
    return path


def resolve_report_to(value: str) -> str | None:
    """The accelerate tracker of train.report_to (None: no tracker). `auto` is tensorboard where it is installed."""
    if value == "none":
        return None
    if value == "auto":
        return "tensorboard" if importlib.util.find_spec("tensorboard") else None
    if importlib.util.find_spec(TRACKER_PACKAGES[value]) is None:
        raise ConfigError(f"train.report_to={value} needs the {TRACKER_PACKAGES[value]} package, which is not "
                          f"installed: pip install {TRACKER_PACKAGES[value]}, or set train.report_to=none")
    return value


def check_mixed_precision(value: str, cuda_available: bool) -> None:
    """fp16 autocast needs a CUDA device; accelerate would otherwise run a CPU job at full precision unasked."""
    if value == "fp16" and not cuda_available:
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU and none is available: set "
                          "train.mixed_precision=no (or bf16, which CPUs run)")


def check_text_file(value: str, what: str) -> None:
    """A file of text lines: refused when missing, a folder, binary or not UTF-8, naming it."""
    path = Path(value).expanduser()
    fix = "give a text file with one prompt per line"
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory: {fix}")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist: {fix}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}): {fix}") from e
    if "\x00" in text:
        raise ConfigError(f"{what} {path} is a binary file: {fix}")


def check_before_import(tree: dict) -> None:
    """The checks of a config tree that need neither torch nor a model (sections' values, the output folder, the
    tracker, the teacher's source, the prompts file), for the command line to run before it imports the
    objectives."""
    from stepdistill.config.checks import check_teacher_source
    from stepdistill.config.loading import plain_sections

    sections = plain_sections(tree)
    check_output_dir(sections["train"].output_dir)
    resolve_report_to(sections["train"].report_to)
    check_teacher_source(sections["teacher"])
    if sections["data"].prompts_file:
        check_text_file(sections["data"].prompts_file, "prompts file")
