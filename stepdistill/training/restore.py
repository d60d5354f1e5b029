"""`stepdistill export`: a checkpoint back into an exported student without optimizers or data. The config saved
in the checkpoint rebuilds teacher and student, the generator's weights (raw, or the EMA the run kept) go in, and
the objective writes its product; a LoRA student of a diffusers teacher can also be written as the adapter alone.
Also what every export gets beside the objective's product: the run's config and, for a diffusers student, a model
card with the run's own example prompt. The folder written is checked first: never inside a run's checkpoints, and
an existing non-empty one only on request, moved aside (`<folder>.replaced-<time>`) rather than replaced."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from stepdistill.config import Config, ConfigError, check_teacher_source, config_from_dict, config_to_dict
from stepdistill.io import write_atomic
from stepdistill.training import checkpoint
from stepdistill.training.ema import EMA_FILE, EMA_SHARDS, GeneratorEMA
from stepdistill.training.rundir import move_aside
from stepdistill.training.step import GENERATOR_MODULE

RUN_CONFIG = "training_config.json"
logger = logging.getLogger(__name__)


def finish_export(folder: Path, cfg: Config, objective, step: int, metrics: tuple[dict, str] | None = None) -> None:
    """The run's config beside an export, and a diffusers student's model card with the teacher's own example
    prompt or else the run's first training prompt, and the (metrics, protocol) measured on this student."""
    from stepdistill.export import RECIPE_FILE
    from stepdistill.export.card import teacher_example_prompt, write_model_card

    write_atomic(folder / RUN_CONFIG, json.dumps(config_to_dict(cfg), indent=2, default=str))
    recipe_file = folder / RECIPE_FILE
    recipe = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    if recipe.get("product") == "diffusers":
        prompts = objective.source.prompts
        prompt = teacher_example_prompt(cfg.teacher.path)
        write_model_card(folder, recipe, prompt or (prompts[0] if prompts else None),
                         {"objective": cfg.objective.name, "steps": step}, metrics)


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder (verified), or a run folder's newest intact checkpoint."""
    if (path / checkpoint.STATE_FILE).is_file():
        problem = checkpoint.verify_checkpoint(path)
        if problem:
            raise ConfigError(f"export: {path} is corrupt ({problem}); give another checkpoint, or the run folder "
                              "to export its newest intact one")
        return path
    if (path / "checkpoints").is_dir():
        found = checkpoint.find_resume_checkpoint(path, "latest-valid", logger.warning)
        if found is not None:
            return found
    raise ConfigError(f"export: {path} is neither a checkpoint (no {checkpoint.STATE_FILE}) nor a run folder with "
                      "one: give runs/NAME/checkpoints/checkpoint-N or runs/NAME")


def in_checkpoints(folder: Path) -> bool:
    """Whether `folder` is a run's checkpoints folder or a checkpoint: what `train.resume` and `export` read."""
    if (folder / checkpoint.STATE_FILE).is_file():
        return True
    return folder.name == "checkpoints" and (any(folder.glob(f"{checkpoint.CHECKPOINT_PREFIX}*")) or
                                             (folder.parent / "config.json").is_file())


def check_export_folder(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse, before any work, an --out inside a run's checkpoints (the export would replace a checkpoint or sit
    among them), one that holds the checkpoint being exported, and an existing non-empty folder unless
    `overwrite` (then it is moved aside, as `train.overwrite` moves a run)."""
    target, source = out.resolve(), source.resolve()
    for folder in (target, *target.parents):
        if in_checkpoints(folder):
            run = folder.parent if folder.name == "checkpoints" else folder.parent.parent
            raise ConfigError(f"export --out {out} is inside the checkpoints of the run {run}: writing there would "
                              f"replace or corrupt a checkpoint; give a folder outside them, e.g. --out "
                              f"{run / ('export-' + source.name)}")
    if source == target or target in source.parents:
        raise ConfigError(f"export --out {out} holds the checkpoint being exported ({source}): give another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"export --out {out} is not empty: choose a new or empty folder, or add --overwrite to "
                          "move its contents aside (they are kept, not deleted)")


def set_aside(out: Path) -> Path | None:
    """Move a non-empty `out` to `<out>.replaced-<time>` (runs' move_aside) and leave no folder at `out`, so the
    export writes a fresh one; returns where the old contents went (None: nothing to move)."""
    aside = move_aside(out)
    if aside is None:
        return None
    for item in out.iterdir():  # move_aside brings a run's reusable caches back: an export reuses none
        os.rename(item, aside / item.name)
    out.rmdir()
    logger.warning("export --overwrite: moved the previous contents of %s to %s (delete it when you no longer "
                   "need it)", out, aside)
    return aside


def checkpoint_config(path: Path) -> Config:
    """The config a checkpoint was written with (its own record, else its run folder's config.json)."""
    saved = checkpoint.read_state(path).get("config")
    if saved is None:
        run_config = path.parent.parent / "config.json"
        if not run_config.is_file():
            raise ConfigError(f"export: {path} records no config and {run_config} does not exist: export it from its "
                              "run folder")
        saved = json.loads(run_config.read_text())
    return config_from_dict(saved)


def load_generator_weights(objective, path: Path, weights: str) -> str:
    """Put the checkpoint's generator weights into the objective's generator; returns which (ema | raw). A sharded
    (FSDP) checkpoint is read whole in this one process (torch.distributed.checkpoint reshards)."""
    modules = list(dict.fromkeys(g.module for g in objective.optimizer_groups()))
    i = modules.index(GENERATOR_MODULE)
    backbone = objective.generator.backbone
    shards = path / f"pytorch_model_fsdp_{i}"
    if shards.is_dir():
        backbone.load_state_dict(read_shards(shards, backbone))
    else:
        backbone.load_state_dict(load_file(str(path / ("model.safetensors" if i == 0 else f"model_{i}.safetensors"))))
    has_ema = (path / EMA_FILE).is_file() or (path / EMA_SHARDS).is_dir()
    if weights == "auto":
        weights = "ema" if has_ema else "raw"
    if weights == "ema":
        if not has_ema:
            raise ConfigError(f"export --weights ema: {path} holds no EMA (the run had train.ema_decay=0): use "
                              "--weights raw")
        ema = GeneratorEMA([p for p in backbone.parameters() if p.requires_grad], decay=0.5)
        ema.load_sharded(path / EMA_SHARDS) if (path / EMA_SHARDS).is_dir() else ema.load(path / EMA_FILE)
        ema.copy_to_model()
    return weights


def read_shards(folder: Path, module) -> dict:
    """A module's full state from accelerate's sharded save (`{"model": state_dict}` in DCP format)."""
    import torch.distributed.checkpoint as dcp

    state = {"model": module.state_dict()}
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return state["model"]


def export_checkpoint(source: str | Path, out: Path, weights: str = "auto", lora: str = "merged",
                      overwrite: bool = False) -> dict:
    """Write the student of a checkpoint (or of a run's newest intact one) into `out`; an existing non-empty `out`
    only with `overwrite`, moved aside first."""
    from accelerate.utils import set_seed

    from stepdistill.export.card import run_metrics
    from stepdistill.objectives import build_objective

    out = Path(out)
    path = find_checkpoint(Path(source))
    check_export_folder(out, path, overwrite)
    cfg = checkpoint_config(path)
    check_teacher_source(cfg.teacher)
    set_seed(cfg.train.seed)
    objective = build_objective(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    used = load_generator_weights(objective, path, weights)
    generator = objective.generator.eval()
    step = checkpoint.read_state(path)["step"]
    aside = set_aside(out) if overwrite else None
    if lora == "adapter":
        from stepdistill.export.diffusers_student import write_lora_adapter

        write_lora_adapter(generator, objective.teacher, out, objective.name)
    else:
        objective.export(generator, out)
        finish_export(out, cfg, objective, step, run_metrics(path.parent.parent, step))
    summary = {"checkpoint": str(path), "step": step, "export": str(out), "weights": used, "lora": lora}
    return {**summary, "previous_export": str(aside)} if aside else summary
