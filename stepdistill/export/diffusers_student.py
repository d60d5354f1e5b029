"""A student of a diffusers teacher as a diffusers pipeline folder: the teacher's pipeline class and components
with the student's backbone (LoRA merged) and a scheduler that reproduces its SamplingRecipe (schedulers.py);
the LoRA also on its own (`lora/`), the recipe in `stepdistill.json`, and a model card (card.py)."""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

from torch import nn

from stepdistill.export.card import (
    base_model_name,
    is_hub_id,
    teacher_example_prompt,
    teacher_license,
    write_model_card,
)
from stepdistill.export.schedulers import scheduler_for
from stepdistill.students.base import Generator
from stepdistill.students.lora import adapter_state_dict

RECIPE_FILE = "stepdistill.json"
LORA_DIR = "lora"


def reads_init_noise_sigma(pipe) -> bool:
    """Whether the pipeline scales its first noise by `scheduler.init_noise_sigma` (pipelines written for VP
    schedulers: SD, SDXL, PixArt), which a flow scheduler must then provide."""
    prepare = getattr(type(pipe), "prepare_latents", None)
    try:
        return prepare is not None and "init_noise_sigma" in inspect.getsource(prepare)
    except (OSError, TypeError):
        return True


def export_scheduler(teacher, sampling):
    """The student's scheduler for the teacher's pipeline and the pipeline kwargs of its own sampling (with what
    the teacher's samples need beyond it: a video's frames and size)."""
    pipe = teacher.pipe
    takes_sigmas = "sigmas" in inspect.signature(type(pipe).__call__).parameters
    scheduler, kwargs = scheduler_for(sampling, pipe.scheduler.config, reads_init_noise_sigma(pipe), takes_sigmas)
    kwargs["guidance_scale"] = sampling.guidance_scale
    kwargs.update(teacher.pipeline_call_kwargs())
    return scheduler, kwargs


def merged_backbone(backbone: nn.Module) -> nn.Module:
    """A copy of the student backbone with any peft LoRA merged into its weights and the adapter removed."""
    net = copy.deepcopy(backbone)
    if getattr(net, "peft_config", None):
        net.fuse_lora()
        net.unload_lora()
    return net.requires_grad_(False).eval()


def save_lora(pipe, name: str, backbone: nn.Module, folder: Path) -> dict:
    """The backbone's LoRA in diffusers' format (pytorch_lora_weights.safetensors, for `pipe.load_lora_weights`)
    with its rank/alpha/targets; returns the adapter weights (empty: no LoRA, nothing written)."""
    lora = adapter_state_dict(backbone)
    if not lora or not hasattr(type(pipe), "save_lora_weights"):
        return {}
    lora_config = backbone.peft_config["default"]
    metadata = {"r": lora_config.r, "lora_alpha": lora_config.lora_alpha,
                "target_modules": sorted(lora_config.target_modules)}
    type(pipe).save_lora_weights(str(folder), **{f"{name}_lora_layers": lora},
                                 **{f"{name}_lora_adapter_metadata": metadata})
    return lora


def write_lora_adapter(generator: Generator, teacher, folder: Path, objective: str = "") -> Path:
    """Only the student's LoRA and its scheduler, to apply to the teacher's own pipeline (atomically):
    `pipe.load_lora_weights(folder)`, `pipe.scheduler = <class>.from_pretrained(folder, subfolder="scheduler")`."""
    from stepdistill.config.schema import ConfigError
    from stepdistill.io import atomic_directory

    if teacher.pipe is None:
        raise ConfigError("export --lora adapter: a student of the analytic teacher is exported with its adapter "
                          "beside the merged weights (lora.safetensors); leave out --lora adapter")
    if not adapter_state_dict(generator.backbone):
        raise ConfigError("export --lora adapter: this student has no LoRA (student.kind is not lora); leave out "
                          "--lora adapter")
    scheduler, kwargs = export_scheduler(teacher, generator.recipe())
    with atomic_directory(folder) as tmp:
        save_lora(teacher.pipe, teacher.backbone_name, generator.backbone, tmp)
        scheduler.save_pretrained(str(tmp / "scheduler"))
        (tmp / RECIPE_FILE).write_text(json.dumps({
            "product": "lora_adapter", "teacher": teacher.identity, "objective": objective,
            "scheduler": type(scheduler).__name__, "pipeline_kwargs": kwargs}, indent=2))
        (tmp / "README.md").write_text(
            f"# LoRA of a distilled student ({objective}), exported by stepdistill\n\nOn the teacher's pipeline "
            f"(`{base_model_name(str(teacher.pipe.name_or_path or ''))}`):\n\n```python\nfrom diffusers import {type(scheduler).__name__}\n"
            f"pipe.load_lora_weights(\"<this folder>\")\npipe.scheduler = {type(scheduler).__name__}"
            f".from_pretrained(\"<this folder>\", subfolder=\"scheduler\")\nimage = pipe(prompt, "
            f"{', '.join(f'{k}={v!r}' for k, v in kwargs.items())}).images[0]\n```\n")
    return Path(folder)


def write_diffusers_student(generator: Generator, teacher, folder: Path, objective: str = "") -> dict:
    """Write the teacher's pipeline with the student's backbone and scheduler into `folder`, plus the LoRA (if
    any), the recipe (stepdistill.json) and a model card; returns the recipe."""
    pipe, name = teacher.pipe, teacher.backbone_name
    sampling = generator.recipe()
    scheduler, kwargs = export_scheduler(teacher, sampling)

    components = dict(pipe.components)
    components[name] = merged_backbone(generator.backbone)
    components["scheduler"] = scheduler
    init_params = inspect.signature(type(pipe).__init__).parameters
    extra = {k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in components and k in init_params}
    type(pipe)(**components, **extra).save_pretrained(str(folder))

    lora = save_lora(pipe, name, generator.backbone, folder / LORA_DIR)
    recipe = {
        "product": "diffusers",
        "pipeline_class": type(pipe).__name__,
        "teacher": teacher.identity,
        "base_model": base_model_name(str(pipe.name_or_path or "")),
        "base_model_on_hub": is_hub_id(str(pipe.name_or_path or "")),
        "license": teacher_license(str(pipe.name_or_path or "")),
        "objective": objective,
        "student_timesteps": sampling.timesteps,
        "prediction_type": sampling.prediction_type,
        "sampling": sampling.as_dict(),
        "scheduler": type(scheduler).__name__,
        "num_inference_steps": sampling.num_steps,
        "pipeline_kwargs": kwargs,
        "guidance_scale": kwargs["guidance_scale"],
        "lora": LORA_DIR if lora else None,
    }
    (folder / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
    write_model_card(folder, recipe, teacher_example_prompt(str(pipe.name_or_path or "")))
    return recipe
