"""Clips longer than a video student was trained for: Magic 1-For-1's test-time sliding window (arXiv 2502.07701,
§3.4; the paper's code has none, so this is the natural reading of it): each window is one image-to-video call
conditioned on the last frame of the window before, whose copy at the start of the next window is dropped. Wan 2.1's
image-to-video models take one conditioning frame, so consecutive windows overlap by that frame.

`seam_distances` measures what the windows cost: the frame-to-frame distance across each seam against the one
inside the windows (equal where the seams are invisible).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image


def sliding_window(pipe, prompt: str, image: Image.Image, num_windows: int, **call_kwargs) -> list[Image.Image]:
    """num_windows image-to-video calls chained by their last frames: num_windows * (F - 1) + 1 frames for windows
    of F frames. `call_kwargs` are the export's recipe (`pipeline_kwargs`) and anything else the pipeline takes."""
    if num_windows < 1:
        raise ValueError(f"num_windows must be at least 1, got {num_windows}")
    frames: list[Image.Image] = []
    for window in range(num_windows):
        clip = list(pipe(prompt=prompt, image=image, output_type="pil", **call_kwargs).frames[0])
        frames += clip if window == 0 else clip[1:]  # frame 0 re-renders the conditioning frame
        image = clip[-1]
    return frames


def _pixels(frame: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0).flatten()


def seam_distances(frames: list[Image.Image], window: int,
                   features: Callable[[Image.Image], torch.Tensor] = _pixels) -> tuple[float, float]:
    """(mean distance between consecutive frames across the seams, mean distance inside the windows) for a clip of
    windows of `window` frames chained as `sliding_window` does; distances are L2 between `features` (default the
    pixels in [0, 1], RMS-normalized by their count)."""
    if window < 2:
        raise ValueError(f"a window holds at least 2 frames, got {window}")
    seams = set(range(window - 1, len(frames) - 1, window - 1))  # the last frame of each window but the final one
    seam, inside = [], []
    for i in range(len(frames) - 1):
        a, b = features(frames[i]), features(frames[i + 1])
        distance = float((a - b).norm() / a.numel() ** 0.5)
        (seam if i in seams else inside).append(distance)
    if not seam:
        raise ValueError(f"{len(frames)} frames in windows of {window} have no seam: chain at least two windows")
    return float(np.mean(seam)), float(np.mean(inside))
