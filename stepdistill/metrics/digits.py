"""Digits metrics: the classifier's pre-activation features for FID and its predictions for prompt accuracy
(the digits analogue of CLIP score)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepdistill.digits import CLASSIFIER_DIR, IMAGE_SIZE, load_classifier


class DigitsFeatures(nn.Module):
    """Images (uint8 in [0, 255], or floats in [0, 255] as clean-fid feeds them) of any size -> the classifier's
    64 pre-activation features; resized to 16x16 with antialiasing when needed."""

    num_features = 64

    def __init__(self, folder: str | Path = CLASSIFIER_DIR) -> None:
        super().__init__()
        self.classifier = load_classifier(folder)

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        x = images.float() / 255.0
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(self.prepare(images))

    @torch.no_grad()
    def predict(self, images01: Tensor) -> Tensor:
        """Digit predictions for float images in [0, 1]."""
        return self.classifier(self.prepare(images01 * 255.0)).argmax(1)


def to_uint8(images01: Tensor) -> Tensor:
    return (images01.clamp(0, 1) * 255).round().to(torch.uint8)


def features(images01: Tensor, model: DigitsFeatures, batch_size: int = 256) -> np.ndarray:
    """Features of float images in [0, 1], quantized to uint8 first as saved images are."""
    u8 = to_uint8(images01)
    return torch.cat([model(c) for c in u8.split(batch_size)]).double().numpy()


def prompt_accuracy(images01: Tensor, digits: Tensor, model: DigitsFeatures) -> float:
    """Fraction of images the classifier reads as the prompted digit."""
    return (model.predict(to_uint8(images01).float() / 255.0) == digits).float().mean().item()


REFERENCE_NAME = "digits_reference.npz"  # cached inside the teacher's folder
TEACHER_GUIDANCE = 3.0  # the digits teacher's CFG scale for its reference samples


def balanced_digits(per_digit: int) -> Tensor:
    return torch.arange(10).repeat(per_digit)


def digits_reference(pipe, path: str | Path, per_digit: int = 50, seed: int = 1000,
                     model: DigitsFeatures | None = None) -> dict:
    """Reference statistics, computed once and cached in `path` (by default `<teacher>/digits_reference.npz`): the
    teacher's 50-step CFG-3 samples (seed) and
    held-out real test digits, with their floors (teacher with seed + 1; real train subset vs real test)."""
    from stepdistill.digits import load_digit_images, sample_teacher
    from stepdistill.metrics.fid import frechet_distance, statistics

    path = Path(path)
    if path.is_file():
        data = np.load(path)
        return {k: data[k] for k in data.files}
    model = model or DigitsFeatures()
    digits = balanced_digits(per_digit)
    ref = sample_teacher(pipe, digits, steps=50, guidance=TEACHER_GUIDANCE, seed=seed)
    other = sample_teacher(pipe, digits, steps=50, guidance=TEACHER_GUIDANCE, seed=seed + 1)
    test, _ = load_digit_images("test")
    train, _ = load_digit_images("train")
    mu_t, sigma_t = statistics(features(ref, model))
    mu_r, sigma_r = statistics(features(test, model))
    out = {"teacher_mu": mu_t, "teacher_sigma": sigma_t, "real_mu": mu_r, "real_sigma": sigma_r,
           "teacher_floor": np.array(frechet_distance(*statistics(features(other, model)), mu_t, sigma_t)),
           "real_floor": np.array(frechet_distance(*statistics(features(train[:len(test)], model)), mu_r, sigma_r)),
           "teacher_accuracy": np.array(prompt_accuracy(other, digits, model)),
           "teacher_vs_real": np.array(frechet_distance(*statistics(features(other, model)), mu_r, sigma_r)),
           "num_samples": np.array(len(digits)), "seed": np.array(seed)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def evaluate_digits(pipe, reference: dict, steps: int, guidance: float, per_digit: int = 50, seed: int = 2000,
                    model: DigitsFeatures | None = None, **pipeline_kwargs) -> tuple[dict, Tensor]:
    """Prompt accuracy, FID vs the teacher's 50-step samples and vs real test digits, and images/s of sampling
    10 x per_digit images in one batch; returns (metrics, images)."""
    import time

    from stepdistill.digits import sample_teacher
    from stepdistill.metrics.fid import frechet_distance, statistics

    model = model or DigitsFeatures()
    digits = balanced_digits(per_digit)
    start = time.perf_counter()
    images = sample_teacher(pipe, digits, steps=steps, guidance=guidance, seed=seed, batch_size=len(digits),
                            **pipeline_kwargs)
    seconds = time.perf_counter() - start
    mu, sigma = statistics(features(images, model))
    return {"steps": steps, "guidance_scale": guidance, "num_samples": len(digits), "seed": seed,
            "prompt_accuracy": prompt_accuracy(images, digits, model),
            "fid_vs_teacher50": frechet_distance(mu, sigma, reference["teacher_mu"], reference["teacher_sigma"]),
            "fid_vs_real": frechet_distance(mu, sigma, reference["real_mu"], reference["real_sigma"]),
            "images_per_s": len(digits) / seconds}, images
