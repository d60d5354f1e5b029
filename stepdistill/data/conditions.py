"""What a batch's conditions are: prompts (text teachers) or class labels (the analytic teacher)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from stepdistill.teachers.base import Cond, Teacher

# Used when a text teacher is given no prompt file: a small, varied default set for smoke runs.
DEFAULT_PROMPTS = [
    "a photo of a cat", "a red sports car on a mountain road", "a bowl of fruit on a wooden table",
    "a lighthouse at sunset", "an astronaut riding a horse", "a watercolor painting of a forest",
    "a city skyline at night", "a portrait of an old man with a beard",
]


class ConditionSource:
    """Maps condition indices to the teacher's conditioning: class labels (GMM) or prompts (text teachers).

    `train_indices` are the conditions a run samples: all of them, or one part of a partition (`restrict`); every
    index stays encodable, so caches of teacher outputs over all conditions are unaffected."""

    def __init__(self, teacher: Teacher, prompts: Sequence[str] | None = None) -> None:
        self.teacher = teacher
        self.num_classes = int(teacher.num_classes)
        self.prompts = list(prompts) if prompts is not None else None
        if self.prompts is not None and not self.prompts:
            raise ValueError("the prompt list is empty: give a prompts file with one prompt per line")
        self.train_indices: list[int] = list(range(len(self)))

    def __len__(self) -> int:
        if self.prompts is not None:
            return len(self.prompts)
        return max(self.num_classes, 1)

    def encode(self, index: Tensor) -> Cond:
        if self.prompts is not None:
            return self.teacher.encode([self.prompts[int(i)] for i in index])
        return self.teacher.encode(index.cpu() if self.num_classes else torch.zeros_like(index.cpu()))

    def conditions(self) -> list[str] | Tensor:
        """Every condition as the teacher encodes it: the prompts, or the class labels."""
        if self.prompts is not None:
            return list(self.prompts)
        return torch.arange(len(self)) if self.num_classes else torch.zeros(1, dtype=torch.long)

    def restrict(self, indices: Sequence[int]) -> None:
        """Sample only the conditions `indices` (e.g. one part of a partition)."""
        if not indices or min(indices) < 0 or max(indices) >= len(self):
            raise ValueError(f"condition indices must be a non-empty subset of 0..{len(self) - 1}")
        self.train_indices = sorted({int(i) for i in indices})

    def identity(self) -> list:
        """What the conditions are (the prompts, or the number of classes): part of every teacher-output cache key."""
        return list(self.prompts) if self.prompts is not None else [len(self)]


def read_prompts(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    if p.is_dir():
        raise FileNotFoundError(f"prompts file {p} is a directory: give a text file with one prompt per line")
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist: give a text file with one prompt per line")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {p} is not UTF-8 text ({e.reason} at byte {e.start}): give a text file "
                         "with one prompt per line") from e
    if "\x00" in text:
        raise ValueError(f"prompts file {p} is a binary file: give a text file with one prompt per line")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {p} holds no prompt: write one prompt per line")
    return prompts


class ConditionDataset(Dataset):
    """Items {"cond_index": indices[i mod len(indices)]}: an epoch visits every condition equally often. `indices`
    are a source's training conditions, or a count n for 0..n-1."""

    def __init__(self, indices: Sequence[int] | int, length: int = 1 << 20) -> None:
        self.indices = list(range(indices)) if isinstance(indices, int) else list(indices)
        self.length = max(length, len(self.indices))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"cond_index": torch.tensor(self.indices[i % len(self.indices)])}


