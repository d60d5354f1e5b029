"""The shapes world, drawn here procedurally (no download): one anti-aliased filled shape (circle, square,
triangle or cross) in one of four colours on a plain dark background, 16x16 RGB, with random position, size,
a small random rotation, colour jitter and background level; prompts "a red triangle". Colour and shape are separate words of
the prompt and separate factors of the class, so a student that mixes colours or melts shapes into blobs loses
prompt accuracy."""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from stepdistill.miniature.dataset import MiniatureDataset

COLOURS = {"red": (0.90, 0.12, 0.10), "green": (0.10, 0.75, 0.20), "blue": (0.15, 0.30, 0.95),
           "yellow": (0.95, 0.85, 0.10)}
SHAPES = ("circle", "square", "triangle", "cross")
IMAGE_SIZE = 16
SUPERSAMPLE = 4  # coverage of each pixel from 4x4 sub-pixel samples: the anti-aliasing
RADIUS = (0.28, 0.44)  # circumradius range, fraction of the side (4.5 to 7 pixels at 16): smaller squares and
# circles become one blob after the VAE's round trip
ROTATION = math.radians(20)  # uniform in +-ROTATION: at any angle a 5-pixel square and a circle are one blob to
# a 1M-parameter UNet on 8x8 latents (a fully rotated variant reached prompt accuracy 0.73 after 1500 steps)
COLOUR_JITTER = 0.06  # per channel, uniform
BACKGROUND = (0.0, 0.15)  # grey level range of the plain background
PER_CLASS = {"train": 300, "test": 50}
SPLIT_SEEDS = {"train": 0, "test": 1}  # separate generator streams: the test images are drawn independently


def class_names() -> tuple[str, ...]:
    return tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)


def _inside(shape: int, u: Tensor, v: Tensor) -> Tensor:
    """Membership of shape-frame points (circumradius 1, centred, unrotated) in shape number `shape`."""
    if SHAPES[shape] == "circle":
        return u * u + v * v <= 0.85 ** 2  # about the square's area, so size alone does not tell them apart
    if SHAPES[shape] == "square":
        return (u.abs() <= 0.72) & (v.abs() <= 0.72)
    if SHAPES[shape] == "triangle":  # equilateral: inside three edges at the inradius 0.55 (circumradius 1.1, so
        inside = torch.ones_like(u, dtype=torch.bool)  # that its area is not far below the others')
        for angle in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6):
            inside &= u * math.cos(angle) + v * math.sin(angle) <= 0.55
        return inside
    arm = 0.32  # cross: two bars of width 2 * arm
    return ((u.abs() <= 0.95) & (v.abs() <= arm)) | ((u.abs() <= arm) & (v.abs() <= 0.95))


def render(labels: Tensor, generator: torch.Generator, size: int = IMAGE_SIZE) -> Tensor:
    """Images [N, 3, size, size] in [0, 1] of the classes `labels` (class = colour * 4 + shape); every random
    draw comes from `generator`, in a fixed order, so the images are a function of its seed."""
    n = len(labels)
    colour, shape = labels // len(SHAPES), labels % len(SHAPES)
    radius = torch.empty(n).uniform_(*RADIUS, generator=generator) * size
    centre = radius[:, None] + torch.rand(n, 2, generator=generator) * (size - 2 * radius[:, None])
    theta = (torch.rand(n, generator=generator) * 2 - 1) * ROTATION
    rgb = torch.tensor(list(COLOURS.values()))[colour]
    rgb = (rgb + (torch.rand(n, 3, generator=generator) * 2 - 1) * COLOUR_JITTER).clamp(0, 1)
    background = torch.empty(n).uniform_(*BACKGROUND, generator=generator)

    points = (torch.arange(size * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    dy = (points[None, :, None] - centre[:, 1, None, None]) / radius[:, None, None]  # [N, H*s, 1]
    dx = (points[None, None, :] - centre[:, 0, None, None]) / radius[:, None, None]  # [N, 1, W*s]
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # the point in the shape's rotated frame
    mask = torch.zeros(u.shape, dtype=torch.bool)
    for s in range(len(SHAPES)):
        chosen = shape == s
        mask[chosen] = _inside(s, u[chosen], v[chosen])
    coverage = mask.float().reshape(n, size, SUPERSAMPLE, size, SUPERSAMPLE).mean((2, 4))[:, None]
    return background[:, None, None, None] + (rgb[:, :, None, None] - background[:, None, None, None]) * coverage


@lru_cache(maxsize=4)
def _split(split: str) -> tuple[Tensor, Tensor]:
    labels = torch.arange(len(COLOURS) * len(SHAPES)).repeat(PER_CLASS[split])
    return render(labels, torch.Generator().manual_seed(SPLIT_SEEDS[split])), labels


def load_shape_images(split: str = "train") -> tuple[Tensor, Tensor]:
    """(images [N, 3, 16, 16] in [0, 1], labels [N]): train 300 and test 50 images per class, balanced."""
    if split == "all":
        parts = [load_shape_images(s) for s in ("train", "test")]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    images, labels = _split(split)
    return images.clone(), labels.clone()


SHAPES_DATASET = MiniatureDataset(
    name="shapes", class_names=class_names(), prompts=tuple(f"a {name}" for name in class_names()),
    image_size=IMAGE_SIZE, loader=load_shape_images,
    real_description=f"procedural shapes test split ({PER_CLASS['test']} per class, generator seed "
                     f"{SPLIT_SEEDS['test']})",
    text_max_length=24,  # "a yellow triangle" is 19 byte tokens with bos/eos
    vae_steps=400, unet_steps=1500, vae_sample_posterior=False, classifier_epochs=20, classifier_shift=0,
    classifier_blur=0.8, classifier_noise=0.03,
    factors=(("colour", len(COLOURS)), ("shape", len(SHAPES))))
