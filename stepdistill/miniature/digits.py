"""The digits world: scikit-learn's bundled `load_digits` (1797 8x8 grey digits, upscaled with antialiasing to
16x16 RGB), prompts "a handwritten digit seven", a fixed stratified 75/25 split."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stepdistill.miniature.dataset import MiniatureDataset

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 16
TEST_FRACTION = 0.25
SPLIT_SEED = 0


def digit_prompt(digit: int) -> str:
    return f"a handwritten digit {DIGIT_NAMES[digit]}"


def load_digit_images(split: str = "train") -> tuple[Tensor, Tensor]:
    """(images [N, 3, 16, 16] in [0, 1], labels [N]) of a fixed stratified split (train | test | all)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    x = x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(data.target, dtype=torch.long)
    if split == "all":
        return x, y
    train_idx, test_idx = train_test_split(range(len(y)), test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                           stratify=y.numpy())
    idx = torch.tensor(train_idx if split == "train" else test_idx)
    return x[idx], y[idx]


DIGITS = MiniatureDataset(
    name="digits", class_names=DIGIT_NAMES, prompts=tuple(digit_prompt(d) for d in range(10)), image_size=IMAGE_SIZE,
    loader=load_digit_images, real_description="sklearn digits test split (25%, stratified, random_state 0)",
    text_max_length=32,  # "a handwritten digit seven" is 27 byte tokens with bos/eos
    vae_steps=200, unet_steps=1500, classifier_epochs=30, classifier_shift=1)
