"""Validation pictures: image grids for latent teachers, scatter plots for the 2-D analytic teacher."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor


def image_grid(images: Tensor, path: str | Path, columns: int | None = None) -> Path:
    """Save images [B, C, H, W] in [0, 1] as one PNG grid."""
    b, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    grid = torch.zeros(c, rows * h, columns * w)
    for i, img in enumerate(images.float().clamp(0, 1).cpu()):
        r, col = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array.squeeze(-1) if c == 1 else array).save(path)
    return Path(path)


def scatter_png(points: Tensor, path: str | Path, reference: Tensor | None = None, size: int = 512,
                extent: float = 1.6) -> Path:
    """Save 2-D points as a PNG scatter plot (reference points in grey underneath)."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)

    def plot(p: Tensor, color: tuple[int, int, int]) -> None:
        xy = ((p[:, :2].float().cpu() / extent + 1) * 0.5 * (size - 1)).tolist()
        for x, y in xy:
            draw.point((x, size - 1 - y), fill=color)

    if reference is not None:
        plot(reference, (190, 190, 190))
    plot(points, (20, 60, 200))
    image.save(path)
    return Path(path)
