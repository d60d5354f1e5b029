"""What a batch's conditions are: prompts (text teachers) or class labels (the analytic teacher). A prompt file is
read lazily (PromptFile), so a file of millions of prompts costs its line offsets, not its text."""
from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
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

    def __init__(self, teacher: Teacher, prompts: Sequence[str] | None = None, images=None) -> None:
        self.teacher = teacher
        self.num_classes = int(teacher.num_classes)
        self.images = images  # conditioning images, one per prompt (ImageFolderDataset): image-conditioned teachers
        self._image_fields: dict[int, dict[str, Tensor]] = {}  # per condition index, batch of 1, on CPU
        if teacher.image_conditioned and torch.device(teacher.device).type != "meta":  # meta: the planner, no data
            if images is None:
                raise ValueError(f"the {type(teacher).__name__} teacher is conditioned on an image as well as a "
                                 "prompt: set data.image_dir to a folder of images with their captions in "
                                 "metadata.jsonl (each image and its caption is one condition)")
            if images.captions is None:
                raise ValueError(f"data.image_dir {images.root} has no metadata.jsonl: an image-conditioned "
                                 "teacher takes each image with its caption ({\"file_name\": ..., \"text\": ...} "
                                 "per line)")
        if images is not None:
            prompts = images.captions
        self.prompts = prompts if prompts is None or isinstance(prompts, PromptFile) else list(prompts)
        if self.prompts is not None and not len(self.prompts):
            raise ValueError("the prompt list is empty: give a prompts file with one prompt per line")
        self.train_indices: Sequence[int] = range(len(self))  # a range: no memory per condition

    def __len__(self) -> int:
        if self.prompts is not None:
            return len(self.prompts)
        return max(self.num_classes, 1)

    def encode(self, index: Tensor) -> Cond:
        if self.images is not None:
            cond = self.teacher.encode([self.prompts[int(i)] for i in index])
            return cond.with_shared(self._images_encoded([int(i) for i in index], cond))
        if self.prompts is not None:
            return self.teacher.encode([self.prompts[int(i)] for i in index])
        return self.teacher.encode(index.cpu() if self.num_classes else torch.zeros_like(index.cpu()))

    def _images_encoded(self, index: list[int], cond: Cond) -> dict[str, Tensor]:
        """The teacher's image fields of conditions `index`, each computed once (alone: no dependence on the batch
        it was first met in) and kept on the CPU."""
        for i in dict.fromkeys(i for i in index if i not in self._image_fields):
            image = (self.images[i]["image"][None] + 1) / 2  # [1, 3, H, W] in [0, 1]
            self._image_fields[i] = {k: v.cpu() for k, v in self.teacher.image_fields(image).items()}
        device = next(iter(cond.fields.values())).device
        return {k: torch.cat([self._image_fields[i][k] for i in index]).to(device) for k in self._image_fields[index[0]]}

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
        """What the conditions are (a digest of the prompts and their count, or the number of classes): part of
        every teacher-output cache key."""
        if self.prompts is None:
            return [len(self)]
        digest = self.prompts.digest if isinstance(self.prompts, PromptFile) else prompts_digest(self.prompts)
        if self.images is not None:
            return [digest, len(self.prompts), prompts_digest(self.images.keys)]
        return [digest, len(self.prompts)]


def prompts_digest(prompts: Iterable[str]) -> str:
    """sha256 of the prompts, one per line: the same for a list and a file holding it."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8") + b"\n")
    return digest.hexdigest()


class PromptFile(Sequence[str]):
    """The prompts of a UTF-8 text file, one per non-empty line (stripped), read on demand.

    One pass records where each prompt starts (8 bytes a prompt in an int64 array: 16 MB for 2M prompts) and a
    digest of the prompts; a prompt is read from the file (pread, no memory map: mapped pages would count as the
    process's memory) when asked for. The file must not change while a run uses it."""

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        if p.is_dir():
            raise FileNotFoundError(f"prompts file {p} is a directory: give a text file with one prompt per line")
        if not p.is_file():
            raise FileNotFoundError(f"prompts file {p} does not exist: give a text file with one prompt per line")
        starts, digest, offset = array("q"), hashlib.sha256(), 0
        with p.open("rb") as f:
            for line in f:
                if b"\x00" in line:
                    raise ValueError(f"prompts file {p} is a binary file: give a text file with one prompt per line")
                try:
                    prompt = line.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    raise ValueError(f"prompts file {p} is not UTF-8 text ({e.reason} at byte {offset + e.start}): "
                                     "give a text file with one prompt per line") from e
                if prompt:
                    starts.append(offset)
                    digest.update(prompt.encode("utf-8") + b"\n")
                offset += len(line)
        if not starts:
            raise ValueError(f"prompts file {p} holds no prompt: write one prompt per line")
        self.path, self.digest = p, digest.hexdigest()
        self.starts = np.frombuffer(starts, dtype=np.int64)
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        start, line, size = int(self.starts[i]), b"", 256
        while b"\n" not in line:
            chunk = os.pread(self._fd, size, start + len(line))
            if not chunk:
                break
            line, size = line + chunk, size * 2
        return line.split(b"\n", 1)[0].decode("utf-8").strip()

    def __getstate__(self) -> dict:  # data-loader workers open the file themselves
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def read_prompts(path: str | os.PathLike) -> PromptFile:
    """The prompts of a file, one per line, checked in one pass and read lazily (PromptFile)."""
    return PromptFile(path)


class ConditionDataset(Dataset):
    """Items {"cond_index": indices[i mod len(indices)]}: an epoch visits every condition equally often. `indices`
    are a source's training conditions, or a count n for 0..n-1."""

    def __init__(self, indices: Sequence[int] | int, length: int = 1 << 20) -> None:
        # a range stays a range (no memory per condition, e.g. a prompt file of millions of lines)
        self.indices = range(indices) if isinstance(indices, int) else \
            indices if isinstance(indices, range) else list(indices)
        self.length = max(length, len(self.indices))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"cond_index": torch.tensor(self.indices[i % len(self.indices)])}


