"""`stepdistill export`: a checkpoint back into an exported student without optimizers or data. The config saved
in the checkpoint rebuilds teacher and student, the generator's weights (raw, or the EMA the run kept) go in, and
the objective writes its product; a LoRA student of a diffusers teacher can also be written as the adapter alone.
Also what every export gets beside the objective's product: the run's config and, for a diffusers student, a model
card with the run's own example prompt."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from stepdistill.config import Config, ConfigError, check_teacher_source, config_from_dict, config_to_dict
from stepdistill.io import write_atomic
from stepdistill.training import checkpoint
from stepdistill.training.ema import EMA_FILE, GeneratorEMA
from stepdistill.training.step import GENERATOR_MODULE

RUN_CONFIG = "training_config.json"
logger = logging.getLogger(__name__)


def finish_export(folder: Path, cfg: Config, objective, step: int) -> None:
    """The run's config beside an export, and a diffusers student's model card with the teacher's own example
    prompt or else the run's first training prompt."""
    from stepdistill.export import RECIPE_FILE
    from stepdistill.export.diffusers_student import teacher_example_prompt, write_model_card

    write_atomic(folder / RUN_CONFIG, json.dumps(config_to_dict(cfg), indent=2, default=str))
    recipe_file = folder / RECIPE_FILE
    if recipe_file.is_file() and json.loads(recipe_file.read_text()).get("product") == "diffusers":
        prompts = objective.source.prompts
        prompt = teacher_example_prompt(json.loads(recipe_file.read_text()).get("base_model", ""))
        write_model_card(folder, prompt or (prompts[0] if prompts else None),
                         {"objective": cfg.objective.name, "steps": step})


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
    """Put the checkpoint's generator weights into the objective's generator; returns which (ema | raw)."""
    modules = list(dict.fromkeys(g.module for g in objective.optimizer_groups()))
    i = modules.index(GENERATOR_MODULE)
    backbone = objective.generator.backbone
    backbone.load_state_dict(load_file(str(path / ("model.safetensors" if i == 0 else f"model_{i}.safetensors"))))
    if weights == "auto":
        weights = "ema" if (path / EMA_FILE).is_file() else "raw"
    if weights == "ema":
        if not (path / EMA_FILE).is_file():
            raise ConfigError(f"export --weights ema: {path} holds no EMA (the run had train.ema_decay=0): use "
                              "--weights raw")
        ema = GeneratorEMA([p for p in backbone.parameters() if p.requires_grad], decay=0.5)
        ema.load(path / EMA_FILE)
        ema.copy_to_model()
    return weights


def export_checkpoint(source: str | Path, out: Path, weights: str = "auto", lora: str = "merged") -> dict:
    """Write the student of a checkpoint (or of a run's newest intact one) into `out`."""
    from accelerate.utils import set_seed

    from stepdistill.objectives import build_objective

    path = find_checkpoint(Path(source))
    cfg = checkpoint_config(path)
    check_teacher_source(cfg.teacher)
    set_seed(cfg.train.seed)
    objective = build_objective(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    used = load_generator_weights(objective, path, weights)
    generator = objective.generator.eval()
    step = checkpoint.read_state(path)["step"]
    if lora == "adapter":
        from stepdistill.export.diffusers_student import write_lora_adapter

        write_lora_adapter(generator, objective.teacher, out, objective.name)
    else:
        objective.export(generator, out)
        finish_export(out, cfg, objective, step)
    return {"checkpoint": str(path), "step": step, "export": str(out), "weights": used, "lora": lora}
