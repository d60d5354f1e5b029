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


def merged_backbone(backbone: nn.Module) -> nn.Module:
    """A copy of the student backbone with any peft LoRA merged into its weights and the adapter removed."""
    net = copy.deepcopy(backbone)
    if getattr(net, "peft_config", None):
        net.fuse_lora()
        net.unload_lora()
    return net.requires_grad_(False).eval()


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

    lora = adapter_state_dict(generator.backbone)
    if lora and hasattr(type(pipe), "save_lora_weights"):
        lora_config = generator.backbone.peft_config["default"]
        metadata = {"r": lora_config.r, "lora_alpha": lora_config.lora_alpha,
                    "target_modules": sorted(lora_config.target_modules)}
        type(pipe).save_lora_weights(str(folder / LORA_DIR), **{f"{name}_lora_layers": lora},
                                     **{f"{name}_lora_adapter_metadata": metadata})
    else:
        lora = {}
    recipe = {
        "product": "diffusers",
        "pipeline_class": type(pipe).__name__,
        "teacher": teacher.identity,
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
    (folder / "README.md").write_text(model_card(recipe, not hasattr(scheduler, "init_noise_sigma")))
    return recipe


def model_card(recipe: dict, needs_init_noise_sigma: bool = False) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in recipe["pipeline_kwargs"].items())
    setup = ""
    if needs_init_noise_sigma:  # a flow scheduler, which pipeline classes written for VP schedulers cannot run
        setup = "pipe.scheduler.init_noise_sigma = 1.0  # SD/SDXL/PixArt pipelines read it; FlowMatch lacks it\n"
    lora = ""
    if recipe["lora"]:
        lora = (f"\nThe student's LoRA (relative to the teacher's weights) is also in `{recipe['lora']}/`: on the "
                f"teacher pipeline, `pipe.load_lora_weights(\"<this folder>/{recipe['lora']}\")`; the backbone "
                "saved here already has it merged.\n")
    return f"""# Distilled student ({recipe['num_inference_steps']}-step), exported by stepdistill

A diffusers `{recipe['pipeline_class']}` folder: the teacher's components with the student's backbone and a
`{recipe['scheduler']}` that reproduces the student's sampling timesteps {recipe['student_timesteps']}
(prediction type `{recipe['prediction_type']}`), guidance_scale {recipe['guidance_scale']}.

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("<this folder>")
{setup}image = pipe("a photo of a cat", {args}).images[0]
```
{lora}
`stepdistill.json` holds the same recipe (`pipeline_kwargs`); `stepdistill.pipelines.load_exported(folder)`
returns the pipeline and the recipe. Teacher: `{recipe['teacher']}`.
"""
