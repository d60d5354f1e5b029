"""Pictures a person reads: labelled image grids (rows named, each tile's prompt written under it, small images
upscaled so that 16-pixel digits are visible) and scatter plots of 2-D samples with axes, the teacher's samples in
their own panel beside the student's."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

MIN_TILE = 128  # smaller images are upscaled (nearest neighbour: the pixels stay visible) to this side
PAD = 4
FONT_SIZE = 12


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


def to_pil(images: Tensor) -> list[Image.Image]:
    """Images [B, C, H, W] in [0, 1] as PIL images."""
    arrays = (images.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).convert("RGB") for a in arrays]


def _text_height(lines: int) -> int:
    return lines * (FONT_SIZE + 3) + 2


def _tile(image: Image.Image, side: int, caption: str | None, caption_lines: int) -> Image.Image:
    """The image upscaled to `side` with a white border and its caption (wrapped) under it."""
    width = side + 2 * PAD
    tile = Image.new("RGB", (width, side + 2 * PAD + (_text_height(caption_lines) if caption_lines else 0)), "white")
    scaled = image.convert("RGB")
    if scaled.width != side:
        resample = Image.NEAREST if scaled.width < side else Image.LANCZOS
        scaled = scaled.resize((side, round(side * image.height / image.width)), resample)
    tile.paste(scaled, (PAD, PAD))
    if caption:
        wrapped = textwrap.wrap(caption, max(8, side // 7))[:caption_lines]
        ImageDraw.Draw(tile).multiline_text((PAD, side + PAD + 2), "\n".join(wrapped), fill="black", font=_font(),
                                            spacing=3)
    return tile


def labelled_grid(rows: list[list[Image.Image]], path: str | Path, row_labels: list[str] | None = None,
                  captions: list[list[str]] | None = None, column_labels: list[str] | None = None) -> Path:
    """Save rows of images as one PNG: each row named on the left, each tile's caption under it, column labels on
    top; tiles laid out by diffusers' make_image_grid."""
    from diffusers.utils import make_image_grid

    columns = max(len(r) for r in rows)
    side = max(MIN_TILE, max(img.width for r in rows for img in r))
    lines = 0
    if captions:
        lines = min(3, max(len(textwrap.wrap(c, max(8, side // 7))) for r in captions for c in r))
    blank = Image.new("RGB", rows[0][0].size, "white")
    tiles = [_tile(r[j] if j < len(r) else blank, side, captions[i][j] if captions and j < len(r) else None, lines)
             for i, r in enumerate(rows) for j in range(columns)]
    body = make_image_grid(tiles, rows=len(rows), cols=columns)
    tile_w, tile_h = tiles[0].size
    left = 0
    if row_labels:
        left = min(220, max(ImageDraw.Draw(body).textlength(label, font=_font()) for label in row_labels) + 12)
        left = int(left)
    heads = [textwrap.wrap(label, max(6, (tile_w - PAD) // 7))[:3] for label in column_labels or []]
    top = _text_height(max(map(len, heads))) + PAD if heads else 0
    canvas = Image.new("RGB", (left + body.width, top + body.height), "white")
    canvas.paste(body, (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(row_labels or []):
        wrapped = textwrap.wrap(label, max(6, (left - 8) // 7))[:4]
        draw.multiline_text((4, top + i * tile_h + PAD), "\n".join(wrapped), fill="black", font=_font(), spacing=3)
    for j, lines in enumerate(heads):
        draw.multiline_text((left + j * tile_w + PAD, 2), "\n".join(lines), fill="black", font=_font(), spacing=3)
    canvas.save(path)
    return Path(path)


def image_grid(images: Tensor, path: str | Path, columns: int | None = None, row_labels: list[str] | None = None,
               captions: list[str] | None = None) -> Path:
    """Save images [B, C, H, W] in [0, 1] as a labelled PNG grid, `columns` per row (default: near-square); clips
    [B, C, F, H, W] show their frames side by side."""
    if images.ndim == 5:
        b, c, f, h, w = images.shape
        images = images.permute(0, 1, 3, 2, 4).reshape(b, c, h, f * w)
    pictures = to_pil(images)
    columns = columns or math.ceil(math.sqrt(len(pictures)))
    rows = [pictures[i:i + columns] for i in range(0, len(pictures), columns)]
    caption_rows = [captions[i:i + columns] for i in range(0, len(pictures), columns)] if captions else None
    return labelled_grid(rows, path, row_labels=row_labels, captions=caption_rows)


def labelled_rows(rows: dict[str, Tensor], path: str | Path, column_labels: list[str]) -> Path:
    """Save rows of images [N, C, H, W] in [0, 1] as one PNG, each row named by its key (e.g. a sampler) and each
    column by its label (e.g. the prompt)."""
    return labelled_grid([to_pil(images) for images in rows.values()], path, row_labels=list(rows),
                         column_labels=column_labels)


def _nice_extent(panels: list[tuple[str, Tensor]]) -> float:
    largest = max(float(p[:, :2].abs().max()) for _, p in panels if len(p))
    return max(0.5, math.ceil(largest * 1.1 * 2) / 2)


def scatter_panels(panels: list[tuple[str, Tensor]], path: str | Path, size: int = 360) -> Path:
    """Save 2-D point sets side by side, one titled panel each, on shared axes with ticks and labels (x, y)."""
    extent = _nice_extent(panels)
    margin_left, margin_top, margin_bottom, gap = 52, 28, 34, 16
    width = margin_left + len(panels) * (size + gap)
    image = Image.new("RGB", (width, margin_top + size + margin_bottom), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    step = extent / 2
    ticks = [i * step for i in range(-2, 3)]
    colors = [(90, 90, 90), (20, 60, 200), (200, 60, 20)]
    for k, (title, points) in enumerate(panels):
        x0, y0 = margin_left + k * (size + gap), margin_top

        def pixel(x: float, y: float, x0: int = x0, y0: int = y0) -> tuple[float, float]:
            return x0 + (x / extent + 1) * 0.5 * (size - 1), y0 + (1 - (y / extent + 1) * 0.5) * (size - 1)

        draw.rectangle((x0, y0, x0 + size - 1, y0 + size - 1), outline="black")
        for t in ticks:
            px, _ = pixel(t, 0)
            _, py = pixel(0, t)
            draw.line((px, y0 + size - 1, px, y0 + size + 3), fill="black")
            draw.text((px - 10, y0 + size + 5), f"{t:g}", fill="black", font=font)
            if k == 0:
                draw.line((x0 - 4, py, x0, py), fill="black")
                draw.text((18, py - 7), f"{t:g}", fill="black", font=font)
        draw.text((x0 + size // 2 - 4, y0 + size + 19), "x", fill="black", font=font)
        draw.text((x0 + 4, 6), f"{title} ({len(points)} samples)", fill="black", font=font)
        color = colors[min(k, len(colors) - 1)]
        for x, y in points[:, :2].float().cpu().tolist():
            px, py = pixel(x, y)
            draw.point((px, py), fill=color)
    draw.text((4, margin_top + size // 2 - 7), "y", fill="black", font=font)
    image.save(path)
    return Path(path)
