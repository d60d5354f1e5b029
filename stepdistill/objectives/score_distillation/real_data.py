"""Real samples for a score-distillation objective's GAN term: the analytic teacher's true mixture, or the one real
image source (`data.image_dir`, encoded to latents once), each with the conditions the samples belong to."""
from __future__ import annotations

import torch
from torch import Tensor

from stepdistill.data import RealImages, open_images
from stepdistill.teachers.base import Cond, Teacher

REAL_DATA = ("", "mixture", "images")


class RealSamples:
    """Real samples: mixture draws of the batch's classes, or random real images with their own captions."""

    def __init__(self, kind: str, teacher: Teacher, images: RealImages | None = None) -> None:
        if kind == "mixture" and teacher.mixture is None:
            raise ValueError("objective.real_data=mixture needs the analytic teacher (teacher.kind=gmm); for image "
                             "teachers set objective.real_data=images and data.image_dir")
        if kind == "images" and images is None:
            raise ValueError("objective.real_data=images needs data.image_dir: a folder of real images")
        self.kind, self.teacher, self.images = kind, teacher, images

    @classmethod
    def from_config(cls, kind: str, teacher: Teacher, data_cfg, cache_dir) -> RealSamples:
        images = None
        if kind == "images":
            if not data_cfg.image_dir:
                raise ValueError("objective.real_data=images needs data.image_dir: a folder of real images")
            folder = open_images(data_cfg.image_dir, data_cfg.resolution, data_cfg.bad_images)
            images = RealImages(folder, teacher, cache_dir)
        return cls(kind, teacher, images)

    @property
    def conditional(self) -> bool:
        """Whether each real sample has a condition of its own (a class, a caption)."""
        return self.images is None or self.images.captions is not None

    def draw(self, cond: Cond, device: torch.device) -> tuple[Tensor, Cond]:
        """Real samples for a batch and their own conditions: mixture draws of the batch's classes (so the batch's
        conditions), or random real images with their captions encoded by the teacher (DMD2's real branch,
        `sd_guidance.py`); without captions, the null condition."""
        n = len(cond)
        if self.images is None:
            return self.teacher.mixture.sample(n, cond.fields.get("class_labels", None)).to(device), cond
        latents, captions = self.images.draw(n, device)
        if captions is None:
            return latents, Cond(dict(cond.null), dict(cond.null), n)
        return latents, self.teacher.encode(captions).to(device)
