"""Students of diffusers teachers as diffusers pipeline folders, and loading them back.

The folder is the teacher's pipeline with the student's backbone (LoRA merged) and a scheduler that
reproduces the student's sampling rule exactly:
  * VP teachers: `LCMScheduler`. Step i predicts x0 at t_i; before the next step it re-noises x0 to t_{i+1}
    with fresh noise, which is the student's k-step rule (`Generator.sample`). Uniform grids like [999] or
    [999, 749, 499, 249] come out of `set_timesteps(k)` with `original_inference_steps` chosen for them;
    other grids (DMD2's one step at t=399) are recorded as explicit `timesteps=[...]`.
  * segmented (MCD / TSCD) students of VP teachers: deterministic DDIM jumps between segment tops, the last
    step to x0: `DDIMScheduler` with trailing spacing where it visits the same timesteps, else
    `EulerDiscreteScheduler` (x0-based Euler in sigma space is DDIM) on explicit `timesteps=[...]`.
  * flow teachers: `FlowMatchEulerDiscreteScheduler` with shift 1 and `stochastic_sampling` (x0 re-noised to
    the next sigma with fresh noise), sampled with explicit `sigmas = t / T`.
Guidance is off (guidance_scale 0: diffusers pipelines apply CFG only for guidance_scale > 1); a UNet with LCM's
guidance embedding gets guidance_scale = w + 1 (the pipelines embed w = guidance_scale - 1 and skip CFG). The sampling
recipe goes to `stepdistill.json`: `pipe(prompt, **recipe["pipeline_kwargs"])`.
"""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

from torch import nn

RECIPE_FILE = "stepdistill.json"
LORA_DIR = "lora"
# The student outputs x0 itself, without LCM's consistency boundary condition x0 = c_skip x_t + c_out f.
# With timestep_scaling = 1e4, c_skip(t) = 0.25 / ((1e4 t)^2 + 0.25) < 3e-9 and c_out = 1 - O(1e-9) for t >= 1.
TIMESTEP_SCALING = 1.0e4


def merged_backbone(backbone: nn.Module) -> nn.Module:
    """A copy of the student backbone with any peft LoRA merged into its weights and the adapter removed."""
    net = copy.deepcopy(backbone)
    if getattr(net, "peft_config", None):
        net.fuse_lora()
        net.unload_lora()
    return net.requires_grad_(False).eval()


def lora_state_dict(backbone: nn.Module) -> dict | None:
    """The student's LoRA weights in peft naming (lora_A / lora_B, what `load_lora_weights` reads), or None when
    it has no adapter."""
    if not getattr(backbone, "peft_config", None):
        return None
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(backbone)


def _on_grid(timesteps: list[int], n: int, num_train: int) -> bool:
    """Whether every timestep lies on LCMScheduler's `original_inference_steps = n` grid (k * T//n - 1)."""
    c = num_train // n
    return all((t + 1) % c == 0 and (t + 1) // c <= n for t in timesteps)


def _scheduler_args(cls, config: dict) -> dict:
    """The teacher scheduler's settings that `cls` accepts (betas, training steps, ...)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in accepted}


def vp_student_scheduler(scheduler_config: dict, timesteps: list[float], prediction_type: str):
    """LCMScheduler for a VP student, and the pipeline kwargs that make it visit exactly `timesteps`."""
    from diffusers import LCMScheduler

    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"a VP student's prediction_type must be epsilon, v_prediction or sample for "
                         f"LCMScheduler, got {prediction_type!r}")
    num_train = int(scheduler_config.get("num_train_timesteps", 1000))
    ints = [int(t) for t in timesteps]
    if ints != list(timesteps) or not all(0 <= t < num_train for t in ints):
        raise ValueError(f"VP student timesteps must be integers in [0, {num_train}), got {timesteps}")
    k = len(ints)
    # the smallest original grid that holds every timestep (no "not on the training schedule" warnings)
    n = next(m for m in range(k, num_train + 1) if _on_grid(ints, m, num_train))
    scheduler = LCMScheduler.from_config(
        _scheduler_args(LCMScheduler, scheduler_config),
        prediction_type=prediction_type, original_inference_steps=n, timestep_scaling=TIMESTEP_SCALING,
        clip_sample=False, thresholding=False,
    )
    scheduler.set_timesteps(k)
    if scheduler.timesteps.tolist() == ints:
        kwargs = {"num_inference_steps": k}
    else:
        scheduler.set_timesteps(timesteps=ints)
        kwargs = {"timesteps": ints}
    if scheduler.timesteps.tolist() != ints:
        raise AssertionError(f"LCMScheduler visits {scheduler.timesteps.tolist()} instead of {ints}")
    return scheduler, kwargs


def segment_student_scheduler(scheduler_config: dict, timesteps: list[float], prediction_type: str):
    """A deterministic scheduler that jumps with DDIM between `timesteps` and ends at x0, and its kwargs."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    ints, k = [int(t) for t in timesteps], len(timesteps)
    common = {"prediction_type": prediction_type}
    scheduler = DDIMScheduler.from_config(_scheduler_args(DDIMScheduler, scheduler_config), **common,
                                          timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False,
                                          thresholding=False)
    scheduler.set_timesteps(k)
    if scheduler.timesteps.tolist() == ints:
        return scheduler, {"num_inference_steps": k}
    # "leading": init_noise_sigma = sqrt(sigma_max^2 + 1) exactly (linspace/trailing use sigma_max)
    scheduler = EulerDiscreteScheduler.from_config(
        _scheduler_args(EulerDiscreteScheduler, scheduler_config), **common, timestep_spacing="leading",
        final_sigmas_type="zero", use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        interpolation_type="linear")
    scheduler.set_timesteps(timesteps=ints)
    if scheduler.timesteps.tolist() != ints:
        raise AssertionError(f"EulerDiscreteScheduler visits {scheduler.timesteps.tolist()} instead of {ints}")
    return scheduler, {"timesteps": ints}


def flow_student_scheduler(scheduler_config: dict, timesteps: list[float], prediction_type: str):
    """FlowMatchEulerDiscreteScheduler (no shift, re-noising steps) and kwargs with sigmas = t / T."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if prediction_type != "flow":
        raise ValueError(f"a flow student must predict velocity (prediction_type flow), got {prediction_type!r}")
    num_train = int(scheduler_config.get("num_train_timesteps", 1000))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        _scheduler_args(FlowMatchEulerDiscreteScheduler, scheduler_config),
        shift=1.0, use_dynamic_shifting=False, stochastic_sampling=True, shift_terminal=None,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, invert_sigmas=False,
    )
    return scheduler, {"sigmas": [float(t) / num_train for t in timesteps]}


def export_student_pipeline(pipe, backbone_name: str, generator, folder: Path, teacher_identity: str = "") -> dict:
    """Write `pipe` with the student's backbone and scheduler into `folder`, plus the LoRA (if any), the recipe
    (stepdistill.json) and a README; returns the recipe."""
    schedule = generator.teacher.schedule
    config = dict(pipe.scheduler.config)
    if schedule.kind != "vp":
        make = flow_student_scheduler
    else:
        make = segment_student_scheduler if generator.sampler == "ddim" else vp_student_scheduler
    scheduler, kwargs = make(config, generator.timesteps, generator.prediction_type)
    kwargs["guidance_scale"] = 0.0 if generator.guidance_w is None else generator.guidance_w + 1.0

    components = dict(pipe.components)
    components[backbone_name] = merged_backbone(generator.backbone)
    components["scheduler"] = scheduler
    init_params = inspect.signature(type(pipe).__init__).parameters
    extra = {k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in components and k in init_params}
    type(pipe)(**components, **extra).save_pretrained(str(folder))

    lora = lora_state_dict(generator.backbone)
    if lora is not None and hasattr(type(pipe), "save_lora_weights"):
        lora_config = generator.backbone.peft_config["default"]
        metadata = {"r": lora_config.r, "lora_alpha": lora_config.lora_alpha,
                    "target_modules": sorted(lora_config.target_modules)}
        type(pipe).save_lora_weights(str(folder / LORA_DIR), **{f"{backbone_name}_lora_layers": lora},
                                     **{f"{backbone_name}_lora_adapter_metadata": metadata})
    else:
        lora = None
    recipe = {
        "pipeline_class": type(pipe).__name__,
        "teacher": teacher_identity,
        "student_timesteps": generator.timesteps,
        "prediction_type": generator.prediction_type,
        "scheduler": type(scheduler).__name__,
        "num_inference_steps": len(generator.timesteps),
        "pipeline_kwargs": kwargs,
        "guidance_scale": kwargs["guidance_scale"],
        "lora": LORA_DIR if lora is not None else None,
    }
    (folder / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
    (folder / "README.md").write_text(_readme(recipe))
    return recipe


def _readme(recipe: dict) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in recipe["pipeline_kwargs"].items())
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
image = pipe("a photo of a cat", {args}).images[0]
```
{lora}
`stepdistill.json` holds the same recipe (`pipeline_kwargs`); `stepdistill.pipelines.load_exported(folder)`
returns the pipeline and the recipe. Teacher: `{recipe['teacher']}`.
"""


def load_exported(folder: str | Path, **from_pretrained_kwargs):
    """(pipeline, recipe) of an exported student: sample with `pipe(prompt, **recipe["pipeline_kwargs"])`."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not (folder / RECIPE_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no {RECIPE_FILE}: it is not a student exported by stepdistill")
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    return DiffusionPipeline.from_pretrained(str(folder), **from_pretrained_kwargs), recipe
