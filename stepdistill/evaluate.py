"""`stepdistill eval`: the digits preset (prompt accuracy, digits FID vs the teacher's 50-step samples and vs real
digits) or a COCO preset on any diffusers pipeline folder; results and protocol go to metrics.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_pipeline(folder: str | Path):
    """(pipeline, recipe): an exported student with its sampling recipe, or any pipeline folder with none."""
    from diffusers import DiffusionPipeline

    from stepdistill.pipelines import RECIPE_FILE, load_exported

    folder = Path(folder)
    if (folder / RECIPE_FILE).is_file():
        pipe, recipe = load_exported(folder)
    elif (folder / "model_index.json").is_file():
        pipe, recipe = DiffusionPipeline.from_pretrained(str(folder)), {}
    else:
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    pipe.set_progress_bar_config(disable=True)
    return pipe, recipe


def evaluate_cli(args: argparse.Namespace) -> dict:
    from stepdistill.metrics.speed import measure_speed

    pipe, recipe = load_pipeline(args.pipeline)
    out = Path(args.out or Path(args.pipeline) / f"eval-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {k: v for k, v in recipe.get("pipeline_kwargs", {}).items()
              if k not in ("guidance_scale", "num_inference_steps")}
    if args.preset == "digits":
        result = _digits(pipe, recipe, args, kwargs)
    else:
        result = _coco(pipe, recipe, args, out)
    if args.speed:
        prompt = "a handwritten digit seven" if args.preset == "digits" else "a photo of a cat"
        result["speed"] = measure_speed(pipe, prompt, result["steps"], result["guidance_scale"],
                                        batch_size=args.batch_size or 16, **kwargs).as_dict()
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def _digits(pipe, recipe: dict, args: argparse.Namespace, kwargs: dict) -> dict:
    from stepdistill import digits
    from stepdistill.metrics.digits import REFERENCE_NAME, TEACHER_GUIDANCE, digits_reference, evaluate_digits

    reference = digits_reference(digits.load_digits_pipeline(), digits.TEACHER_DIR / REFERENCE_NAME)
    steps = args.steps or recipe.get("num_inference_steps", 50)
    guidance = args.guidance if args.guidance is not None else recipe.get("guidance_scale", TEACHER_GUIDANCE)
    metrics, _ = evaluate_digits(pipe, reference, steps, guidance, args.num_samples or 50,
                                 2000 if args.seed is None else args.seed, **kwargs)
    return {"preset": "digits", "pipeline": str(args.pipeline), **metrics,
            "floors": {"fid_teacher_vs_teacher": float(reference["teacher_floor"]),
                       "fid_real_vs_real": float(reference["real_floor"])},
            "feature_model": "digits classifier, 64 pre-activation features",
            "fid_library": "clean-fid frechet_distance"}


def _coco(pipe, recipe: dict, args: argparse.Namespace, out: Path) -> dict:
    from stepdistill.metrics.clip import DEFAULT_CLIP
    from stepdistill.metrics.coco import get_preset, run_coco_eval
    from stepdistill.metrics.fid import FIDProtocol

    if not args.captions:
        raise ValueError(f"preset {args.preset} needs --captions (e.g. annotations/captions_val2014.json)")
    preset = get_preset(args.preset, num_samples=args.num_samples, eval_resolution=args.resolution, seed=args.seed,
                        steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch_size)
    protocol = FIDProtocol(args.fid_backend, args.fid_mode, args.feature, args.inception_weights)
    if args.reference and not preset.fid:
        preset.fid = True
    if args.clip_model and not preset.clip:
        preset.clip = True
    result = run_coco_eval(pipe, preset, args.captions, out, args.reference, args.clip_model or DEFAULT_CLIP,
                           protocol, recipe, pipeline_path=str(args.pipeline))
    return result
