"""A student of a diffusers teacher as a diffusers pipeline folder: the teacher's pipeline class and components
with the student's backbone (LoRA merged) and a scheduler that reproduces its SamplingRecipe (schedulers.py);
the LoRA also on its own (`lora/`), the recipe in `stepdistill.json`, and a model card."""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

from torch import nn

from stepdistill.export.schedulers import scheduler_for
from stepdistill.students.base import Generator
from stepdistill.students.lora import adapter_state_dict

RECIPE_FILE = "stepdistill.json"
LORA_DIR = "lora"
DEFAULT_EXAMPLE_PROMPT = "a photo of a cat"  # when neither the teacher's card nor the run gives one


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
    scheduler, kwargs = scheduler_for(generator.recipe(), teacher.pipe.scheduler.config)
    kwargs["guidance_scale"] = generator.recipe().guidance_scale
    with atomic_directory(folder) as tmp:
        save_lora(teacher.pipe, teacher.backbone_name, generator.backbone, tmp)
        scheduler.save_pretrained(str(tmp / "scheduler"))
        (tmp / RECIPE_FILE).write_text(json.dumps({
            "product": "lora_adapter", "teacher": teacher.identity, "objective": objective,
            "scheduler": type(scheduler).__name__, "pipeline_kwargs": kwargs}, indent=2))
        (tmp / "README.md").write_text(
            f"# LoRA of a distilled student ({objective}), exported by stepdistill\n\nOn the teacher's pipeline "
            f"(`{teacher.pipe.name_or_path}`):\n\n```python\nfrom diffusers import {type(scheduler).__name__}\n"
            f"pipe.load_lora_weights(\"<this folder>\")\npipe.scheduler = {type(scheduler).__name__}"
            f".from_pretrained(\"<this folder>\", subfolder=\"scheduler\")\nimage = pipe(prompt, "
            f"{', '.join(f'{k}={v!r}' for k, v in kwargs.items())}).images[0]\n```\n")
    return Path(folder)


def write_diffusers_student(generator: Generator, teacher, folder: Path, objective: str = "") -> dict:
    """Write the teacher's pipeline with the student's backbone and scheduler into `folder`, plus the LoRA (if
    any), the recipe (stepdistill.json) and a model card; returns the recipe."""
    pipe, name = teacher.pipe, teacher.backbone_name
    sampling = generator.recipe()
    scheduler, kwargs = scheduler_for(sampling, pipe.scheduler.config)
    kwargs["guidance_scale"] = sampling.guidance_scale

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
        "base_model": str(pipe.name_or_path or ""),
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
    write_model_card(folder, teacher_example_prompt(recipe["base_model"]))
    return recipe


def teacher_example_prompt(base_model: str) -> str | None:
    """The example prompt the teacher's own model card gives (its widget, or a DreamBooth-style instance
    prompt), where a local card exists."""
    from huggingface_hub import ModelCard

    card = Path(base_model) / "README.md"
    if not card.is_file():
        return None
    data = ModelCard.load(card).data.to_dict()
    widget = data.get("widget") or []
    if widget and isinstance(widget[0], dict) and widget[0].get("text"):
        return str(widget[0]["text"])
    return data.get("instance_prompt")


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).exists()


def write_model_card(folder: Path, example_prompt: str | None = None, training: dict | None = None) -> Path:
    """README.md of an export: a huggingface_hub ModelCard whose metadata names the base model, the objective,
    the sampling steps and guidance, and whose text gives the exact call (with `example_prompt`, the teacher's own
    or the run's first training prompt) and why the pipeline's default arguments are not the student's."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    base = recipe.get("base_model", "")
    prompt = example_prompt or DEFAULT_EXAMPLE_PROMPT
    args = ", ".join(f"{k}={v!r}" for k, v in recipe["pipeline_kwargs"].items())
    extra = {"base_model": base} if _is_hub_id(base) else {"teacher": base or recipe["teacher"]}
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image",
                         tags=["stepdistill", "distillation", f"{recipe['num_inference_steps']}-step",
                               *([recipe["objective"]] if recipe["objective"] else [])],
                         objective=recipe["objective"], num_inference_steps=recipe["num_inference_steps"],
                         guidance_scale=recipe["guidance_scale"], scheduler=recipe["scheduler"],
                         student_timesteps=recipe["student_timesteps"], example_prompt=prompt,
                         **({"training": training} if training else {}), **extra)
    setup = ""
    if recipe["scheduler"].startswith("FlowMatch"):  # SD/SDXL/PixArt pipelines read it; FlowMatch schedulers lack it
        setup = "pipe.scheduler.init_noise_sigma = 1.0  # needed by pipelines written for VP schedulers\n"
    lora = ""
    if recipe["lora"]:
        lora = (f"\nThe student's LoRA (relative to the teacher's weights) is also in `{recipe['lora']}/`: on the "
                f"teacher pipeline, `pipe.load_lora_weights(\"<this folder>/{recipe['lora']}\")`; the backbone "
                "saved here already has it merged.\n")
    note = recipe["sampling"].get("note")
    note = f"\n{note}\n" if note else ""
    trained = (f"Distilled from `{base or recipe['teacher']}` with the `{recipe['objective']}` objective"
               + (f" for {training['steps']} training steps" if training and "steps" in training else "") + ".")
    text = f"""# Distilled student ({recipe['num_inference_steps']}-step), exported by stepdistill

{trained} A diffusers `{recipe['pipeline_class']}` folder: the teacher's components with the student's backbone
and a `{recipe['scheduler']}` that reproduces the student's sampling timesteps {recipe['student_timesteps']}
(prediction type `{recipe['prediction_type']}`), guidance_scale {recipe['guidance_scale']}.

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("<this folder>")
{setup}image = pipe({prompt!r}, {args}).images[0]
```

Pass these arguments: the pipeline's defaults (50 steps, guidance 7.5) are the teacher's, not the student's,
and the scheduler refuses or misuses them. From the shell: `stepdistill sample <this folder> {prompt!r}`.
{note}{lora}
`stepdistill.json` holds the same recipe (`pipeline_kwargs`); `stepdistill.pipelines.load_exported(folder)`
returns the pipeline and the recipe.
"""
    path = folder / "README.md"
    ModelCard(f"---\n{data.to_yaml()}\n---\n{text}").save(path)
    return path
