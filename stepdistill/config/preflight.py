"""Checks of a run's settings against the machine, before any work and without a model: the output folder can be
created and written, the precision suits the device, the tracker is installed, a pipeline folder holds readable
weights, and a teacher is not one of our one-step students."""
from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

from stepdistill.config.schema import ConfigError

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
RECIPE_FILE = "stepdistill.json"  # what an export of ours records (stepdistill.export writes it)
RUN_CONFIG = "training_config.json"  # the config of the run an export came from, beside it
WEIGHT_SUFFIXES = (".safetensors", ".bin")


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


def recorded_teacher(folder: str | Path) -> str | None:
    """The teacher.path of the run an export of ours was distilled from (its training_config.json), or None."""
    record = Path(folder) / RUN_CONFIG
    if not record.is_file():
        return None
    path = (json.loads(record.read_text()).get("teacher") or {}).get("path")
    return str(path) if path else None


def check_not_student(path: Path, what: str = "teacher.path") -> None:
    """Refuse one of our one-step students as a teacher: it has no multi-step ODE to distill. Multi-step exports
    and flow students that sample at any step count (a reflow round's teacher) pass."""
    record = path / RECIPE_FILE
    if not record.is_file():
        return
    recipe = json.loads(record.read_text())
    if recipe.get("num_inference_steps") != 1 or (recipe.get("sampling") or {}).get("any_num_steps"):
        return
    origin = recorded_teacher(path)
    fix = f"give the teacher it was distilled from, {what}={origin}" if origin else "give a multi-step teacher"
    raise ConfigError(f"{what} {path} is a one-step student exported by stepdistill ({RECIPE_FILE}: 1 step at "
                      f"timesteps {recipe.get('student_timesteps')}), not a multi-step teacher: {fix}")


def check_pipeline_weights(folder: Path, what: str) -> None:
    """Every model component of a pipeline folder (a sub-folder with config.json that model_index.json lists)
    holds weights whose files are complete (safetensors headers cover the files), naming the missing or broken
    file and the fix; other problems are left to diffusers."""
    index = folder / "model_index.json"
    try:
        spec = json.loads(index.read_text())
    except (OSError, ValueError):
        return
    fix = ("the folder is incomplete: write it again (stepdistill export CHECKPOINT --out FOLDER for a student) or "
           "copy it completely")
    for name, value in spec.items() if isinstance(spec, dict) else ():
        component = folder / name
        if name.startswith("_") or not isinstance(value, list) or not (component / "config.json").is_file():
            continue
        weights = sorted(p for p in component.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if not weights:
            raise ConfigError(f"{what} {folder}: {name}/ holds no weights file (*.safetensors): {fix}")
        for shards in component.glob("*.index.json"):
            missing = sorted(set(json.loads(shards.read_text()).get("weight_map", {}).values())
                             - {p.name for p in weights})
            if missing:
                raise ConfigError(f"{what} {folder}: {name}/{missing[0]}, which {shards.name} lists, is missing: {fix}")
        for file in (p for p in weights if p.suffix == ".safetensors"):
            _check_safetensors(file, f"{what} {folder}: {name}/{file.name}", fix)


def _check_safetensors(file: Path, where: str, fix: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="np"):
            pass
    except SafetensorError as e:
        raise ConfigError(f"{where} is truncated or corrupt ({e}): {fix}") from e


def check_resume_path(train) -> None:
    """A checkpoint folder given as train.resume exists (latest / latest-valid are looked up by the trainer)."""
    if train.resume not in ("", "latest", "latest-valid") and not Path(train.resume).expanduser().exists():
        raise ConfigError(f"train.resume {train.resume} does not exist: give a checkpoint folder (e.g. "
                          f"{train.output_dir}/checkpoints/checkpoint-500), or train.resume=latest for the newest "
                          "in train.output_dir")


def check_before_import(tree: dict) -> None:
    """The checks of a config tree that need neither torch nor a model (sections' values, the output folder, the
    tracker, the teacher's source, the prompts file), for the command line to run before it imports the
    objectives."""
    from stepdistill.config.checks import check_teacher_source
    from stepdistill.config.loading import plain_sections

    sections = plain_sections(tree)
    check_output_dir(sections["train"].output_dir)
    check_resume_path(sections["train"])
    resolve_report_to(sections["train"].report_to)
    check_teacher_source(sections["teacher"])
    teacher = Path(sections["teacher"].path).expanduser()
    if sections["teacher"].kind not in ("gmm", "mlp") and teacher.is_dir():
        check_not_student(teacher)
        check_pipeline_weights(teacher, "teacher.path")
    if sections["data"].prompts_file:
        check_text_file(sections["data"].prompts_file, "prompts file")
