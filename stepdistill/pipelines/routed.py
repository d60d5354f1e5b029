"""Multi-student inference (MSD, arXiv 2410.23274 §3): K students behind one call, each condition of a batch sent by
the partition to exactly one student, so a batch costs one student step per image as a single student does.

`RoutedPipeline` loads a routed export of diffusers students (`export/routed.py`): the shared components (VAE, text
encoders, tokenizers, scheduler) once, one backbone per student. `RoutedGenerator` does the same for in-memory
generators (e.g. MLP students of the analytic teacher)."""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from stepdistill.data.partition import Partition, load_partition
from stepdistill.export.diffusers_student import RECIPE_FILE
from stepdistill.teachers.base import Cond


@dataclass
class RoutedPipelineOutput:
    images: Tensor | np.ndarray | list  # in the batch's order, as the students' pipelines return them
    parts: Tensor  # the student that made each image


class RoutedPipeline:
    """K student pipelines sharing every component but their backbone, and the partition that routes prompts."""

    def __init__(self, pipelines: list, partition: Partition, recipe: dict | None = None) -> None:
        from stepdistill.teachers.loading import detect_kind, teacher_class

        if len(pipelines) != partition.num_parts:
            raise ValueError(f"{len(pipelines)} student pipelines for a partition of {partition.num_parts} parts")
        self.pipelines, self.partition, self.recipe = pipelines, partition, dict(recipe or {})
        # the teacher adapter over the shared text encoders: prompts are embedded exactly as in training
        self.encoder = teacher_class(detect_kind(pipelines[0]))(pipelines[0], device=pipelines[0].device)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> RoutedPipeline:
        """Load a routed export: `kwargs` go to the first student's `DiffusionPipeline.from_pretrained`; the other
        students' backbones follow its dtype and device."""
        from diffusers import DiffusionPipeline

        folder = Path(folder)
        recipe = json.loads((folder / RECIPE_FILE).read_text())
        if recipe.get("product") != "routed" or recipe.get("student_product") != "diffusers":
            raise ValueError(f"{folder} is not a routed export of diffusers students (its {RECIPE_FILE} says "
                             f"product {recipe.get('product')!r}, students {recipe.get('student_product')!r})")
        first = DiffusionPipeline.from_pretrained(str(folder / recipe["students"][0]), **kwargs)
        name = recipe["backbone"]
        template = getattr(first, name)
        init_params = inspect.signature(type(first).__init__).parameters
        settings = {k: v for k, v in first.config.items()  # e.g. requires_safety_checker
                    if not k.startswith("_") and k not in first.components and k in init_params}
        pipelines = [first]
        for student in recipe["students"][1:]:
            backbone = type(template).from_pretrained(str(folder / student / name)).to(template.device)
            if backbone.dtype != template.dtype:
                backbone = backbone.to(template.dtype)
            pipelines.append(type(first)(**{**first.components, name: backbone}, **settings))
        return cls(pipelines, load_partition(folder / recipe["partition"]), recipe)

    @property
    def device(self) -> torch.device:
        return self.pipelines[0].device

    def to(self, *args, **kwargs) -> RoutedPipeline:
        for pipe in self.pipelines:
            pipe.to(*args, **kwargs)
        self.encoder.device = self.device
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        for pipe in self.pipelines:
            pipe.set_progress_bar_config(**kwargs)

    def route(self, prompts: list[str]) -> Tensor:
        """The student of every prompt."""
        return self.partition.route(self.encoder.encode(prompts, cache=False))

    def noise(self, n: int, height: int | None, width: int | None, generator) -> Tensor:
        """Initial latents of a batch, drawn as a single pipeline call over the whole batch draws them."""
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipelines[0]
        backbone = getattr(pipe, self.recipe.get("backbone", "unet"))
        size = backbone.config.sample_size
        latent = (height or size * pipe.vae_scale_factor) // pipe.vae_scale_factor, \
            (width or size * pipe.vae_scale_factor) // pipe.vae_scale_factor
        return randn_tensor((n, backbone.config.in_channels, *latent), generator=generator, device=self.device,
                            dtype=backbone.dtype)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, generator=None, latents: Tensor | None = None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 **kwargs) -> RoutedPipelineOutput:
        """Sample every prompt with its student; the arguments are the students' pipeline arguments."""
        if prompt is None:
            raise ValueError("RoutedPipeline routes by prompt: pass prompt= (prompt embeddings cannot be routed)")
        if num_images_per_prompt != 1:
            raise ValueError("RoutedPipeline makes one image per prompt: repeat the prompt instead")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        parts = self.route(prompts)
        if latents is None:
            latents = self.noise(len(prompts), height, width, generator)
        images: list = [None] * len(prompts)
        for k in parts.unique().tolist():  # students in order, so each draws its later noise from one stream
            idx = torch.nonzero(parts == k).flatten().tolist()
            sub_generator = [generator[i] for i in idx] if isinstance(generator, list) else generator
            out = self.pipelines[k]([prompts[i] for i in idx], generator=sub_generator, latents=latents[idx],
                                    height=height, width=width, **kwargs).images
            for j, i in enumerate(idx):
                images[i] = out[j]
        if isinstance(images[0], Tensor):
            images = torch.stack(images)
        elif isinstance(images[0], np.ndarray):
            images = np.stack(images)
        return RoutedPipelineOutput(images, parts)


class RoutedGenerator(nn.Module):
    """K in-memory generators behind one `sample`: each condition is sampled by the generator it is routed to."""

    def __init__(self, generators: list[nn.Module], partition: Partition) -> None:
        super().__init__()
        if len(generators) != partition.num_parts:
            raise ValueError(f"{len(generators)} generators for a partition of {partition.num_parts} parts")
        self.generators, self.partition = nn.ModuleList(generators), partition

    @property
    def teacher(self):
        return self.generators[0].teacher

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Cond, num_steps: int | None = None) -> Tensor:
        parts = self.partition.route(cond).to(noise.device)
        out = torch.empty_like(noise)
        for k, generator in enumerate(self.generators):
            idx = torch.nonzero(parts == k).flatten()
            if len(idx):
                out[idx] = generator.sample(noise[idx], cond.index(idx.cpu()), num_steps)
        return out


def load_routed_generator(folder: str | Path, teacher) -> RoutedGenerator:
    """A routed export of MLP students (the analytic teacher's) as a RoutedGenerator over `teacher`."""
    from stepdistill.export.mlp import load_mlp_student

    folder = Path(folder)
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    if recipe.get("product") != "routed" or recipe.get("student_product") != "mlp":
        raise ValueError(f"{folder} is not a routed export of MLP students")
    generators = [load_mlp_student(folder / student, teacher) for student in recipe["students"]]
    return RoutedGenerator(generators, load_partition(folder / recipe["partition"]))
