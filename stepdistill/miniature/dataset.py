"""What a miniature text-to-image world is: labelled images at one small resolution, one prompt per class, and
where its teacher, classifier and prompt file live. One definition per dataset (`digits.py`, `shapes.py`); the
teacher builder, the classifier and the miniature metrics are written once against this class."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from stepdistill.io import write_atomic

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class MiniatureDataset:
    """A labelled image set with one prompt per class.

    `loader(split)` returns (images [N, 3, S, S] in [0, 1], labels [N]) for split train | test | all; the test
    split is held out from every training (classifier, VAE, UNet) and is the real reference of FID vs real.
    `factors` names the attributes a class combines, as (name, count) pairs in mixed radix with the last factor
    varying fastest (shapes: colour x shape, so class = colour * 4 + shape); per-factor accuracies then show
    which attribute a student gets wrong."""

    name: str
    class_names: tuple[str, ...]
    prompts: tuple[str, ...]
    image_size: int
    loader: Callable[[str], tuple[Tensor, Tensor]]
    real_description: str  # what the real reference is, for the protocol records
    text_max_length: int = 32
    guidance: float = 3.0  # CFG scale of the teacher's reference samples and of its accuracy in training.json
    vae_steps: int = 200
    vae_sample_posterior: bool = True  # decode posterior samples while training the VAE (False: its mean)
    unet_steps: int = 1500
    unet_lr: float = 2e-3
    classifier_epochs: int = 30
    classifier_shift: int = 1  # random circular shifts (pixels) while training the classifier; 0: none
    classifier_blur: float = 0.0  # random Gaussian blur, sigma uniform in [0, this] pixels; 0: none
    classifier_noise: float = 0.0  # random Gaussian noise, std uniform in [0, this]; 0: none
    factors: tuple[tuple[str, int], ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.prompts)

    @property
    def teacher_dir(self) -> Path:
        return ASSETS / f"{self.name}_teacher"

    @property
    def classifier_dir(self) -> Path:
        return ASSETS / f"{self.name}_classifier"

    @property
    def prompts_file(self) -> Path:
        return ASSETS / "configs" / f"{self.name}_prompts.txt"

    @property
    def reference_name(self) -> str:
        """The cached FID reference statistics inside the teacher's folder."""
        return f"{self.name}_reference.npz"

    def load_images(self, split: str = "train") -> tuple[Tensor, Tensor]:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        return self.loader(split)

    def write_image_folder(self, folder: str | Path, split: str = "train") -> Path:
        """The split's images as PNGs captioned by their prompts (metadata.jsonl): `data.image_dir` for a GAN's
        real branch or score matching on real images."""
        from PIL import Image

        images, labels = self.load_images(split)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (image, label) in enumerate(zip(images, labels)):
            name = f"{i:05d}.png"
            array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(array).save(folder / name)
            lines.append(json.dumps({"file_name": name, "text": self.prompts[int(label)]}))
        write_atomic(folder / "metadata.jsonl", "\n".join(lines) + "\n")
        return folder

    def balanced_labels(self, per_class: int) -> Tensor:
        """0, 1, ..., C-1 repeated per_class times: every prefix of C labels covers every class once."""
        return torch.arange(self.num_classes).repeat(per_class)

    def factor_labels(self, labels: Tensor) -> dict[str, Tensor]:
        """Each factor's index of every class label (empty without factors)."""
        out, rest = {}, labels
        for name, count in reversed(self.factors):
            out[name] = rest % count
            rest = rest // count
        return dict(reversed(out.items()))


@torch.no_grad()
def sample_pipeline(pipe, dataset: MiniatureDataset, labels: Tensor, steps: int = 50, guidance: float = 3.0,
                    seed: int = 0, batch_size: int = 500, **pipeline_kwargs) -> Tensor:
    """Images [N, 3, S, S] in [0, 1] from a pipeline's own sampler, prompted with the classes in `labels`; one
    generator seeded once draws all the batches' noise in order."""
    out = []
    g = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    for chunk in labels.split(batch_size):
        images = pipe([dataset.prompts[c] for c in chunk.tolist()], num_inference_steps=steps,
                      guidance_scale=guidance, generator=g, output_type="pt", height=dataset.image_size,
                      width=dataset.image_size, **pipeline_kwargs).images
        out.append(images.float().cpu())
    return torch.cat(out)
