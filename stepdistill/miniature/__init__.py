"""Miniature text-to-image worlds small enough to train a teacher on two CPU cores: the datasets (`digits`,
`shapes`), their classifier (FID features and prompt accuracy), the one teacher builder and the demo.

Layering, so that nothing imports in a circle: the data layer (`dataset`, `digits`, `shapes`, `classifier`)
imports nothing of `stepdistill.evaluation`; evaluation imports the data layer; the teacher builder (`teacher`,
which caches the teacher's FID reference) and the demo (`demo`) sit above evaluation."""
from __future__ import annotations

from stepdistill.miniature.dataset import MiniatureDataset
from stepdistill.miniature.digits import DIGITS
from stepdistill.miniature.shapes import SHAPES_DATASET

DATASETS: dict[str, MiniatureDataset] = {d.name: d for d in (DIGITS, SHAPES_DATASET)}


def get_dataset(name: str | MiniatureDataset) -> MiniatureDataset:
    if isinstance(name, MiniatureDataset):
        return name
    if name not in DATASETS:
        raise ValueError(f"no miniature dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


__all__ = ["DATASETS", "MiniatureDataset", "get_dataset"]
