"""`stepdistill eval`: a miniature preset (digits | shapes: prompt accuracy, FID on the world's classifier
features vs the teacher's 50-step samples and vs real held-out images) or a COCO preset, on an exported student or
any diffusers pipeline folder; results and protocol go to metrics.json. A miniature preset is refused for a model
of the other world, and settings a preset does not use are refused rather than ignored."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from stepdistill.config import ConfigError
from stepdistill.config.preflight import check_pipeline_weights, recorded_teacher
from stepdistill.miniature import DATASETS
from stepdistill.pipelines import load_exported

logger = logging.getLogger(__name__)
TEACHER_RECORD = "training.json"  # what `stepdistill teacher WORLD` writes beside a miniature teacher


def pipeline_world(folder: str | Path, depth: int = 4) -> str | None:
    """The miniature world of a pipeline folder: a teacher that `stepdistill teacher WORLD` built (its
    training.json records the command), or an export of ours distilled from one (its training_config.json names
    the teacher, itself perhaps an earlier stage's export); None when the records do not say."""
    folder = Path(folder)
    record = folder / TEACHER_RECORD
    if record.is_file():
        words = str(json.loads(record.read_text()).get("command", "")).split()
        if words[:2] == ["stepdistill", "teacher"] and len(words) > 2 and words[2] in DATASETS:
            return words[2]
    teacher = recorded_teacher(folder)
    return pipeline_world(teacher, depth - 1) if teacher and depth > 0 else None


def check_eval_inputs(args: argparse.Namespace) -> None:
    """Before the pipeline loads: its weights are complete, a miniature preset matches the model's world, and no
    option is given that the preset would ignore."""
    folder = Path(args.pipeline)
    check_pipeline_weights(folder, "eval:")
    if args.preset not in DATASETS:
        return
    if args.resolution is not None:
        raise ConfigError(f"eval --resolution applies to the COCO presets (the side images are resized to for FID); "
                          f"the {args.preset} preset evaluates at its world's "
                          f"{DATASETS[args.preset].image_size} px: leave --resolution out")
    world = pipeline_world(folder)
    if world is not None and world != args.preset:
        raise ConfigError(f"eval --preset {args.preset}: {folder} is a {world} model (its records name the {world} "
                          f"teacher), and the {args.preset} metrics would compare it with another world: use "
                          f"--preset {world}")
    if world is None:
        logger.warning("eval --preset %s: %s does not record which miniature world it was trained on; its metrics "
                       "compare it with the %s world (prompts, classifier, teacher samples)", args.preset, folder,
                       args.preset)


def evaluate_cli(args: argparse.Namespace) -> dict:
    from stepdistill.evaluation.sampling_speed import measure_speed
    from stepdistill.pipelines import sampling_kwargs

    check_eval_inputs(args)
    pipe, recipe = load_exported(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    out = Path(args.out or Path(args.pipeline) / f"eval-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    kwargs = sampling_kwargs(recipe, args.steps)
    if args.preset in DATASETS:
        result = _miniature(pipe, recipe, args, kwargs)
    else:
        result = _coco(pipe, recipe, args, out)
    if args.speed:
        if args.preset in DATASETS:
            from stepdistill.miniature import get_dataset

            prompt = get_dataset(args.preset).prompts[0]
        else:
            prompt = "a photo of a cat"
        result["speed"] = measure_speed(pipe, prompt, result["steps"], result["guidance_scale"],
                                        batch_size=args.batch_size or 16, **kwargs).as_dict()
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def _miniature(pipe, recipe: dict, args: argparse.Namespace, kwargs: dict) -> dict:
    from stepdistill.evaluation.miniature import (
        EVAL_SEED,
        evaluate_pipeline,
        floors,
        load_reference,
        recipe_sampling,
    )
    from stepdistill.miniature import get_dataset

    dataset = get_dataset(args.preset)
    reference = load_reference(dataset)
    steps, guidance = recipe_sampling(recipe, dataset, args.steps, args.guidance)
    metrics, _ = evaluate_pipeline(pipe, dataset, reference, steps, guidance, args.num_samples or 50,
                                   EVAL_SEED if args.seed is None else args.seed, **kwargs)
    return {"preset": dataset.name, "pipeline": str(args.pipeline), **metrics, "floors": floors(reference),
            "feature_model": f"{dataset.name} classifier, 64 pre-activation features",
            "real_reference": dataset.real_description, "fid_library": "clean-fid frechet_distance"}


def feature_module(name: str):
    """The FID feature module of a --feature name: None (the backend's Inception) or a miniature classifier."""
    if name == "inception":
        return None
    from stepdistill.miniature import get_dataset
    from stepdistill.miniature.classifier import ClassifierFeatures

    return ClassifierFeatures(get_dataset(name).classifier_dir)


def _coco(pipe, recipe: dict, args: argparse.Namespace, out: Path) -> dict:
    from stepdistill.evaluation.clip import DEFAULT_CLIP
    from stepdistill.evaluation.coco import get_preset, run_coco_eval
    from stepdistill.evaluation.fid import FIDProtocol

    if not args.captions:
        raise ValueError(f"preset {args.preset} needs --captions (e.g. annotations/captions_val2014.json)")
    preset = get_preset(args.preset, num_samples=args.num_samples, eval_resolution=args.resolution, seed=args.seed,
                        steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch_size)
    protocol = FIDProtocol(args.fid_backend, args.fid_mode, args.feature, args.inception_weights)
    if args.reference and not preset.fid:
        preset.fid = True
    if args.clip_model and not preset.clip:
        preset.clip = True
    return run_coco_eval(pipe, preset, args.captions, out, args.reference, args.clip_model or DEFAULT_CLIP,
                         protocol, recipe, pipeline_path=str(args.pipeline),
                         feature_module=feature_module(args.feature) if preset.fid else None)
