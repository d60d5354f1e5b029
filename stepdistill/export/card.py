"""The model card (README.md) of a diffusers student export: a huggingface_hub ModelCard whose metadata names the
base model (`base_model` only for a hub id: a local teacher is named by its folder, never by a path of this
machine), the license (the teacher's, where its model card or the miniature teacher command says it), the
objective, the sampling and the metrics the run measured; its text gives the student's exact call and says what
the pipeline's default call (`pipe(prompt)`, no other argument) does with it."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

DEFAULT_EXAMPLE_PROMPT = "a photo of a cat"  # when neither the teacher's card nor the run gives one
# the project's license (pyproject.toml), which the teachers of `stepdistill teacher` (the miniature worlds) carry
MINIATURE_TEACHER_LICENSE = "apache-2.0"
RUN_METRICS = "metrics.json"  # what a run or the demo measured, in the run folder


def is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).exists()


def base_model_name(name_or_path: str) -> str:
    """A hub id as it is; a local folder by its folder name (a path names nothing on another machine)."""
    if not name_or_path or is_hub_id(name_or_path):
        return name_or_path
    return Path(name_or_path).resolve().name


def teacher_card(name_or_path: str) -> Path | None:
    """The teacher's own model card: in its local folder, or in the hub cache for a hub id (never downloaded)."""
    if not name_or_path:
        return None
    local = Path(name_or_path) / "README.md"
    if local.is_file():
        return local
    if is_hub_id(name_or_path):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "README.md")
        return Path(cached) if isinstance(cached, str) else None
    return None


def _card_data(card: Path | None) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard.load(card).data.to_dict() if card is not None else {}


def teacher_example_prompt(name_or_path: str) -> str | None:
    """The example prompt the teacher's own model card gives (its widget, or a DreamBooth-style instance prompt)."""
    data = _card_data(teacher_card(name_or_path))
    widget = data.get("widget") or []
    if widget and isinstance(widget[0], dict) and widget[0].get("text"):
        return str(widget[0]["text"])
    return data.get("instance_prompt")


def teacher_license(name_or_path: str) -> str | None:
    """The teacher's license: its model card's, or the project's for a teacher `stepdistill teacher` trained
    (its training.json records the command); None when unknown."""
    license_ = _card_data(teacher_card(name_or_path)).get("license")
    if license_:
        return str(license_)
    training = Path(name_or_path) / "training.json" if name_or_path else None
    if training is not None and training.is_file():
        command = str(json.loads(training.read_text()).get("command", ""))
        if command.startswith("stepdistill teacher "):
            return MINIATURE_TEACHER_LICENSE
    return None


def run_metrics(run_dir: Path, step: int) -> tuple[dict, str] | None:
    """(metrics, protocol) of a run folder's metrics.json when it was measured at `step` (it records its "steps"):
    metrics of another step are not this student's."""
    path = Path(run_dir) / RUN_METRICS
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not data.get("metrics") or data.get("steps") != step:
        return None
    protocol = data.get("metrics_protocol") or data.get("protocol") or ""
    return data["metrics"], protocol if isinstance(protocol, str) else json.dumps(protocol)


def _default_guidance(pipeline_class: str) -> float | None:
    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    param = inspect.signature(cls.__call__).parameters.get("guidance_scale") if cls is not None else None
    return param.default if param is not None and isinstance(param.default, (int, float)) else None


def default_call(recipe: dict) -> str:
    """What `pipe(prompt)` with no other argument does with this export (the pipeline's defaults: 50 steps and its
    own guidance scale): the sentence the model card shows."""
    k, scheduler, sampling = recipe["num_inference_steps"], recipe["scheduler"], recipe["sampling"]
    if sampling.get("any_num_steps"):
        steps = f"50 Euler steps of the student's own flow, which samples at any step count ({k} by default here)"
    elif scheduler == "LCMScheduler":
        steps = (f"50 LCM steps (x0 predicted, then re-noised to the next of 50 evenly spaced timesteps): an image, "
                 f"but not the student's {k}-step sample at timesteps {recipe['student_timesteps']}")
    elif scheduler.startswith("FlowMatch"):
        steps = (f"50 Euler steps of the unshifted flow: an image, but not the student's {k}-step sample at "
                 f"timesteps {recipe['student_timesteps']}")
    else:
        steps = (f"50 deterministic {scheduler} steps: an image, but not the student's {k}-step sample at "
                 f"timesteps {recipe['student_timesteps']}")
    scale, trained = _default_guidance(recipe["pipeline_class"]), recipe["guidance_scale"]
    if scale is None or scale == trained:
        guidance = ""
    elif "w" in sampling:  # a UNet with a guidance embedding: the pipeline embeds w = guidance_scale - 1, no CFG
        guidance = f", with the guidance embedding at w = {scale - 1:g} where the student samples at w = {sampling['w']:g}"
    elif trained > 1:
        guidance = f", with guidance_scale {scale:g} where the student samples at {trained:g}"
    else:
        guidance = (f", with classifier-free guidance at the pipeline's default scale {scale:g}, which the student "
                    "was not trained with")
    return f"`pipe(prompt)` alone runs the pipeline's defaults: {steps}{guidance}."


def _metrics_text(metrics: dict, protocol: str) -> str:
    rows = {name: m for name, m in metrics.items() if isinstance(m, dict)}
    if rows:
        keys = [k for k in dict.fromkeys(k for m in rows.values() for k in m) if
                all(isinstance(m.get(k, 0), (int, float)) for m in rows.values())]
        lines = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{m[k]:.4g}" if k in m else "" for k in keys) + " |"
                  for name, m in rows.items()]
    else:
        lines = [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in metrics.items()]
    text = "\n".join(lines)
    return f"\n## Measured by the run\n\n{text}\n" + (f"\nProtocol: {protocol}\n" if protocol else "")


def write_model_card(folder: Path, recipe: dict, example_prompt: str | None = None, training: dict | None = None,
                     metrics: tuple[dict, str] | None = None) -> Path:
    """README.md of a diffusers export (recipe: its stepdistill.json): metadata, the exact call with
    `example_prompt` (the teacher's own or the run's first training prompt), what the default call does instead,
    and `metrics` = (metrics, protocol) the run measured."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    base, license_ = recipe.get("base_model", ""), recipe.get("license")
    on_hub = bool(base) and recipe.get("base_model_on_hub", False)
    prompt = example_prompt or DEFAULT_EXAMPLE_PROMPT
    args = ", ".join(f"{k}={v!r}" for k, v in recipe["pipeline_kwargs"].items())
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", license=license_,
                         base_model=base if on_hub else None,
                         tags=["stepdistill", "distillation", f"{recipe['num_inference_steps']}-step",
                               *([recipe["objective"]] if recipe["objective"] else [])],
                         objective=recipe["objective"], num_inference_steps=recipe["num_inference_steps"],
                         guidance_scale=recipe["guidance_scale"], scheduler=recipe["scheduler"],
                         student_timesteps=recipe["student_timesteps"], example_prompt=prompt,
                         **({"training": training} if training else {}),
                         **({"metrics": metrics[0]} if metrics else {}))
    teacher = (f"the hub model `{base}`" if on_hub else
               f"a local teacher folder `{base}` (not a hub model, so the metadata names no base_model)")
    trained = (f"Distilled from {teacher}" + (f" with the `{recipe['objective']}` objective" if recipe["objective"]
                                              else "")
               + (f" for {training['steps']} training steps" if training and "steps" in training else "") + ".")
    licensed = (f"License: `{license_}`, the teacher's." if license_ else
                "License: unknown; the teacher's license applies (see its model card).")
    lora = ""
    if recipe["lora"]:
        lora = (f"\nThe student's LoRA (relative to the teacher's weights) is also in `{recipe['lora']}/`: on the "
                f"teacher pipeline, `pipe.load_lora_weights(\"<this folder>/{recipe['lora']}\")`; the backbone "
                "saved here already has it merged.\n")
    note = recipe["sampling"].get("note")
    note = f"\n{note}\n" if note else ""
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if scheduler_config.is_file() and "init_noise_sigma" in json.loads(scheduler_config.read_text()):
        note += (f"\nLoading it, diffusers warns that `init_noise_sigma` is not a `{recipe['scheduler']}` argument: "
                 f"`{recipe['pipeline_class']}` scales its first noise by that value, which the scheduler's config "
                 "provides (1, the unit variance of a flow's pure noise).\n")
    text = f"""# Distilled student ({recipe['num_inference_steps']}-step), exported by stepdistill

{trained} A diffusers `{recipe['pipeline_class']}` folder: the teacher's components with the student's backbone
and a `{recipe['scheduler']}` that reproduces the student's sampling timesteps {recipe['student_timesteps']}
(prediction type `{recipe['prediction_type']}`), guidance_scale {recipe['guidance_scale']}. {licensed}

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("<this folder>")
image = pipe({prompt!r}, {args}).images[0]
```

These arguments sample the student as it was trained. {default_call(recipe)} From the shell:
`stepdistill sample <this folder> {prompt!r}`.
{note}{lora}{_metrics_text(*metrics) if metrics else ""}
`stepdistill.json` holds the same recipe (`pipeline_kwargs`); `stepdistill.pipelines.load_exported(folder)`
returns the pipeline and the recipe.
"""
    path = folder / "README.md"
    ModelCard(f"---\n{data.to_yaml()}\n---\n{text}").save(path)
    return path


def add_card_metrics(folder: Path, recipe: dict, metrics: dict, protocol: str = "") -> Path:
    """Rewrite an export's model card with metrics measured after it was written (e.g. the demo's evaluation),
    keeping its example prompt and training facts."""
    data = _card_data(Path(folder) / "README.md")
    return write_model_card(folder, recipe, data.get("example_prompt"), data.get("training"), (metrics, protocol))
