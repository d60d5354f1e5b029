"""Metrics of a miniature world (digits, shapes): prompt accuracy read by the world's classifier (the analogue
of CLIP score), FID on the classifier's features against the teacher's 50-step CFG samples (distillation
fidelity) and against the held-out real split, images/s; the reference statistics are computed once and cached
in the teacher's folder. `evaluate_student(folder, "shapes")` scores an exported student of either teacher."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stepdistill.evaluation.fid import frechet_distance, statistics
from stepdistill.miniature import MiniatureDataset, get_dataset
from stepdistill.miniature.classifier import ClassifierFeatures
from stepdistill.miniature.dataset import sample_pipeline
from stepdistill.pipelines import load_exported, sampling_kwargs

REFERENCE_SEED = 1000  # the teacher's reference set; seed + 1 draws the second set behind the teacher floor
EVAL_SEED = 2000


def to_uint8(images01: Tensor) -> Tensor:
    return (images01.clamp(0, 1) * 255).round().to(torch.uint8)


def features(images01: Tensor, model: ClassifierFeatures, batch_size: int = 256) -> np.ndarray:
    """Features of float images in [0, 1], quantized to uint8 first as saved images are."""
    return torch.cat([model(c) for c in to_uint8(images01).split(batch_size)]).double().numpy()


def predictions(images01: Tensor, model: ClassifierFeatures) -> Tensor:
    return model.predict(to_uint8(images01).float() / 255.0)


def prompt_accuracy(images01: Tensor, labels: Tensor, model: ClassifierFeatures) -> float:
    """Fraction of images the classifier reads as the prompted class."""
    return (predictions(images01, model) == labels).float().mean().item()


def factor_accuracies(predicted: Tensor, labels: Tensor, dataset: MiniatureDataset) -> dict[str, float]:
    """Per-factor accuracy (shapes: colour_accuracy, shape_accuracy); empty for a dataset without factors."""
    got, want = dataset.factor_labels(predicted), dataset.factor_labels(labels)
    return {f"{name}_accuracy": (got[name] == want[name]).float().mean().item() for name in want}


def _fid(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    return frechet_distance(*statistics(x), mu, sigma)


def read_reference(path: str | Path) -> dict:
    data = np.load(path)
    return {k: data[k] for k in data.files}


def build_reference(pipe, dataset: str | MiniatureDataset, path: str | Path, per_class: int = 50,
                    seed: int = REFERENCE_SEED, classifier_dir: str | Path | None = None) -> dict:
    """Reference statistics, computed once and cached in `path` (`<teacher>/<name>_reference.npz`): the
    teacher's 50-step samples at the dataset's CFG (seed), balanced over the classes, and the held-out real split;
    with their floors (a second teacher set, seed + 1; a real train subset of the test split's size vs test)."""
    path = Path(path)
    if path.is_file():
        return read_reference(path)
    dataset = get_dataset(dataset)
    model = ClassifierFeatures(classifier_dir or dataset.classifier_dir)
    labels = dataset.balanced_labels(per_class)
    ref = sample_pipeline(pipe, dataset, labels, steps=50, guidance=dataset.guidance, seed=seed)
    other = sample_pipeline(pipe, dataset, labels, steps=50, guidance=dataset.guidance, seed=seed + 1)
    test, _ = dataset.load_images("test")
    train, _ = dataset.load_images("train")
    mu_t, sigma_t = statistics(features(ref, model))
    mu_r, sigma_r = statistics(features(test, model))
    other_features = features(other, model)
    predicted = predictions(other, model)
    out = {"teacher_mu": mu_t, "teacher_sigma": sigma_t, "real_mu": mu_r, "real_sigma": sigma_r,
           "teacher_floor": np.array(_fid(other_features, mu_t, sigma_t)),
           "real_floor": np.array(_fid(features(train[:len(test)], model), mu_r, sigma_r)),
           "teacher_accuracy": np.array((predicted == labels).float().mean().item()),
           "teacher_vs_real": np.array(_fid(other_features, mu_r, sigma_r)),
           "num_samples": np.array(len(labels)), "seed": np.array(seed)}
    out.update({f"teacher_{k}": np.array(v) for k, v in factor_accuracies(predicted, labels, dataset).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def load_reference(dataset: str | MiniatureDataset, teacher_dir: str | Path | None = None) -> dict:
    """The cached reference of a teacher's folder (the shipped teacher's unless `teacher_dir`), built if missing."""
    dataset = get_dataset(dataset)
    folder = Path(teacher_dir or dataset.teacher_dir)
    path = folder / dataset.reference_name
    if path.is_file():
        return read_reference(path)
    pipe, _ = load_exported(folder)
    return build_reference(pipe, dataset, path)


def floors(reference: dict) -> dict[str, float]:
    return {"fid_teacher_vs_teacher": float(reference["teacher_floor"]),
            "fid_real_vs_real": float(reference["real_floor"])}


def evaluate_pipeline(pipe, dataset: str | MiniatureDataset, reference: dict, steps: int, guidance: float,
                      per_class: int = 50, seed: int = EVAL_SEED, model: ClassifierFeatures | None = None,
                      **pipeline_kwargs) -> tuple[dict, Tensor]:
    """Prompt accuracy (and per-factor accuracies), FID vs the teacher's 50-step samples and vs the real test
    split, and images/s of sampling classes x per_class images in one batch (wall time, first call included);
    returns (metrics, images)."""
    dataset = get_dataset(dataset)
    model = model or ClassifierFeatures(dataset.classifier_dir)
    labels = dataset.balanced_labels(per_class)
    start = time.perf_counter()
    images = sample_pipeline(pipe, dataset, labels, steps=steps, guidance=guidance, seed=seed,
                             batch_size=len(labels), **pipeline_kwargs)
    seconds = time.perf_counter() - start
    mu, sigma = statistics(features(images, model))
    predicted = predictions(images, model)
    metrics = {"steps": steps, "guidance_scale": guidance, "num_samples": len(labels), "seed": seed,
               "prompt_accuracy": (predicted == labels).float().mean().item(),
               **factor_accuracies(predicted, labels, dataset),
               "fid_vs_teacher50": frechet_distance(mu, sigma, reference["teacher_mu"], reference["teacher_sigma"]),
               "fid_vs_real": frechet_distance(mu, sigma, reference["real_mu"], reference["real_sigma"]),
               "images_per_s": len(labels) / seconds}
    return metrics, images


def recipe_sampling(recipe: dict, dataset: MiniatureDataset, steps: int | None = None,
                    guidance: float | None = None) -> tuple[int, float]:
    """Steps and CFG to sample a pipeline folder with: those given, else its export recipe's, else 50 steps at the
    world's reference CFG (a plain pipeline such as the teacher)."""
    return (steps or recipe.get("num_inference_steps", 50),
            guidance if guidance is not None else recipe.get("guidance_scale", dataset.guidance))


def evaluate_student(folder: str | Path, teacher: str | MiniatureDataset = "digits", per_class: int = 50,
                     seed: int = EVAL_SEED, teacher_dir: str | Path | None = None, steps: int | None = None,
                     guidance: float | None = None) -> dict:
    """Metrics of a pipeline folder (an exported student, sampled with its recipe, or a plain pipeline such as the
    teacher, at 50 steps and the reference CFG unless given) against the `teacher` world's reference: steps,
    guidance_scale, prompt_accuracy (+ per-factor accuracies), fid_vs_teacher50, fid_vs_real, images_per_s,
    and the two floors."""
    dataset = get_dataset(teacher)
    reference = load_reference(dataset, teacher_dir)
    pipe, recipe = load_exported(folder)
    steps, guidance = recipe_sampling(recipe, dataset, steps, guidance)
    metrics, _ = evaluate_pipeline(pipe, dataset, reference, steps, guidance, per_class, seed,
                                   **sampling_kwargs(recipe, steps))
    return {"teacher": dataset.name, "pipeline": str(folder), **metrics, "floors": floors(reference)}


def markdown_table(metrics: dict, reference: dict, extra_columns: dict[str, str] | None = None,
                   real: str = "real test digits") -> str:
    """The metrics table of the demo and the benchmark; `extra_columns` maps a header to a metrics key."""
    extra = extra_columns or {}
    lines = [f"| model | steps | CFG | prompt accuracy | FID vs teacher 50-step | FID vs {real} | images/s |"
             + "".join(f" {header} |" for header in extra),
             "|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    for name, m in metrics.items():
        lines.append(f"| {name} | {m['steps']} | {m['guidance_scale']:g} | {m['prompt_accuracy']:.3f} | "
                     f"{m['fid_vs_teacher50']:.2f} | {m['fid_vs_real']:.2f} | {m['images_per_s']:.1f} |"
                     + "".join(f" {m.get(key, '')} |" for key in extra.values()))
    lines.append(f"| floors | | | | {float(reference['teacher_floor']):.2f} (teacher vs teacher, other seeds) | "
                 f"{float(reference['real_floor']):.2f} (real train vs real test) | |" + " |" * len(extra))
    return "\n".join(lines)
