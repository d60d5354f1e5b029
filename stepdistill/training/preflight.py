"""The trainer's checks before work: the inputs a config names (teacher source, options, the objective's own
refusals, the partition, prompts, real images) before the teacher loads; the checkpoint to resume from; the student
the objective built (its parameterization and timesteps against its schedule) before any pair generation or training."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from stepdistill.config import Config, ConfigError, check_teacher_source
from stepdistill.data import open_images, read_prompts
from stepdistill.data.partition import check_partition_config
from stepdistill.objectives import objective_class
from stepdistill.training import checkpoint, options


def check_inputs(cfg: Config, load_teacher: bool, warn: Callable[..., None]) -> None:
    """Checks that need no model: the teacher's source, options, the objective's refusals, the prompt file, the
    real images."""
    if load_teacher:
        check_teacher_source(cfg.teacher)
    options.check_attention(cfg.train.attention)
    if cfg.teacher.offload and (refusal := options.teacher_offload_refusal(cfg)):
        raise ConfigError(refusal)
    objective_class(cfg.objective.name).preflight(cfg)
    check_partition_config(cfg.data.partition)
    if cfg.data.prompts_file:
        read_prompts(cfg.data.prompts_file)
    if cfg.data.image_dir:
        images = open_images(cfg.data.image_dir, cfg.data.resolution, cfg.data.bad_images)
        if images.num_skipped:
            warn("data.image_dir: skipped %d bad files (%s); training on %d images", images.num_skipped,
                 ", ".join(f"{len(v)} {k}" for k, v in images.skipped.items()), len(images))


def check_checkpoint_config(path: Path, identity: dict, digest: str, warn: Callable[..., None]) -> None:
    """Refuse a checkpoint written with another config, naming the keys that differ."""
    saved = checkpoint.read_state(path)
    if "config_hash" not in saved:
        warn("%s records no config (an older stepdistill wrote it): resuming without checking it", path)
    elif saved["config_hash"] != digest:
        diffs = checkpoint.config_differences(saved.get("config", {}), identity)
        shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
        raise ConfigError(f"train.resume: {path} was written with another config ({shown}): resume with the config "
                          "that wrote it, or start a new run in another train.output_dir")


def check_generator(generator, cfg: Config) -> None:
    """The student fits its schedule: a parameterization the schedule has, and timesteps inside its range (a VP
    teacher's model timesteps stop at T - 1; beyond, training would clamp silently and the export refuse)."""
    kind, prediction = generator.schedule.kind, generator.prediction_type
    if (prediction == "flow" and kind != "flow") or (prediction == "v_prediction" and kind == "flow"):
        fix = "flow" if prediction == "flow" else "teacher"
        raise ConfigError(f"student.prediction_type={prediction} does not fit the student's {kind} schedule: unset "
                          f"student.prediction_type, or set student.schedule={fix}")
    low, high = generator.schedule.timestep_range()
    outside = [_number(t) for t in generator.timesteps if not low <= t <= high]
    if outside:
        configured = list(generator.timesteps) == [float(t) for t in cfg.student.timesteps]
        key = "student.timesteps" if configured else f"the {cfg.objective.name} objective's student timesteps"
        raise ConfigError(f"{key} {[_number(t) for t in generator.timesteps]}: {outside} lie outside the {kind} "
                          f"schedule's model timesteps [{low:g}, {high:g}]: use e.g. student.timesteps=[{high:g}]")


def _number(t: float) -> int | float:
    return int(t) if float(t).is_integer() else t
