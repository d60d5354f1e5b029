"""Hooks: things that happen around training steps without being part of them (previews, the console and tracker
logs, and whatever a test or a user registers). A hook overrides the events it needs."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from stepdistill.training.trainer import Trainer


class Hook:
    def on_train_start(self, trainer: Trainer) -> None:
        """After resuming, before the first step."""

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        """After every training step (trainer.step already counts it)."""

    def on_checkpoint_written(self, trainer: Trainer, folder: Path) -> None:
        """A checkpoint's files are written into the temporary `folder`, not yet renamed into place."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the final checkpoint and export."""


# Factories of hooks every Trainer gets (tests register theirs; a CLI wrapper may too).
DEFAULT_HOOKS: list[Callable[[], Hook]] = []


@torch.no_grad()
def save_preview(generator, source, n: int, path: str | Path, seed: int = 0) -> Path:
    """Sample n conditions with fixed noise and save a picture: an image grid captioned with each sample's prompt
    or class, or for 2-D data the student's samples beside the teacher's."""
    from stepdistill.visualize import image_grid, scatter_panels

    teacher = generator.teacher
    device = next(generator.parameters()).device
    g = torch.Generator().manual_seed(seed)
    index = torch.arange(n) % len(source)
    noise = torch.randn((n, *teacher.sample_shape), generator=g).to(device)
    cond = source.encode(index).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        x0 = generator.sample(noise, cond)
    if teacher.makes_images:
        captions = [source.prompts[int(i)] for i in index] if source.prompts is not None else None
        return image_grid(teacher.decode(x0), path, captions=captions)
    m = max(n, 1024)  # enough teacher samples to show the modes
    labels = torch.arange(m) % source.num_classes if source.num_classes else None
    reference = teacher.mixture.sample(m, labels, generator=g)
    return scatter_panels([("teacher", reference), ("student", x0)], path)
