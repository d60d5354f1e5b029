"""Real images: one source for every objective with a real-data branch (DMD2's GAN term). A folder of images,
optionally captioned by a `metadata.jsonl` ({"file_name": ..., "text": ...} per line, the layout of the Hugging
Face imagefolder), or a folder of WebDataset tar shards (data/shards.py); checked once up front with the bad-file
policy, encoded once with the teacher's VAE and cached. `open_images` (data/shards.py) picks the kind from the folder."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import Dataset

from stepdistill.io import save_tensors_atomic, write_atomic
from stepdistill.teachers.base import Teacher

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_FILE = "metadata.jsonl"


def admit_image(source, name: str, resolution: int, skipped: dict[str, list[str]]) -> bool:
    """Whether the image at `source` (a path or a file object) decodes and has the size `resolution` (when set);
    otherwise `name` is recorded in `skipped` under its reason."""
    from PIL import Image

    try:
        with Image.open(source) as img:
            img.load()
            size = img.size
    except (OSError, ValueError, Image.DecompressionBombError):
        skipped["unreadable"].append(name)
        return False
    if resolution and size != (resolution, resolution):
        skipped["mis-sized"].append(f"{name} ({size[0]}x{size[1]})")
        return False
    return True


def refuse_bad_images(root: Path, skipped: dict[str, list[str]], resolution: int, policy: str,
                      unit: str) -> list[str]:
    """The bad-file policy: with "refuse", any skipped image stops the run with a list of them; the list either way."""
    bad = [f"{reason}: {f}" for reason, items in skipped.items() for f in items]
    if bad and policy == "refuse":
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        expected = f" (expected {resolution}x{resolution})" if resolution else ""
        raise ValueError(f"data.image_dir {root} has {len(bad)} bad {unit}{expected}: {shown}. Fix or remove "
                         "them, or set data.bad_images=skip to train without them")
    return bad


class ImageFolderDataset(Dataset):
    """Real images from a folder, every file decoded once up front: unreadable files, and files whose size is not
    `resolution` x `resolution` (when set), are refused with a list of them, or skipped and counted."""

    def __init__(self, directory: str | os.PathLike, resolution: int = 0, policy: str = "refuse") -> None:
        root = Path(directory)
        if not root.is_dir():
            what = "is a file" if root.exists() else "does not exist"
            raise FileNotFoundError(f"data.image_dir {root} {what}: give a folder of images")
        self.root = root
        self.files: list[Path] = []
        self.skipped: dict[str, list[str]] = {"unreadable": [], "mis-sized": []}
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            if admit_image(path, str(path), resolution, self.skipped):
                self.files.append(path)
        bad = refuse_bad_images(root, self.skipped, resolution, policy, "files")
        if not self.files:
            raise ValueError(f"data.image_dir {root} holds no usable image ({', '.join(IMAGE_SUFFIXES)}; "
                             f"{len(bad)} skipped)")
        self.resolution = resolution
        self.captions = read_captions(root, self.files)

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    @property
    def keys(self) -> list[str]:
        """What names each image (part of the latent cache's key)."""
        return [str(f) for f in self.files]

    def samples(self) -> Iterator:
        """Every usable image, in order, as an RGB PIL image."""
        from PIL import Image

        for path in self.files:
            with Image.open(path) as img:
                yield img.convert("RGB")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        """{"image": [3, H, W] in [-1, 1]}."""
        import numpy as np
        from PIL import Image

        with Image.open(self.files[i]) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.float32)
        return {"image": torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0}


def read_captions(root: Path, files: list[Path]) -> list[str] | None:
    """The caption of every file from root/metadata.jsonl, or None without that file."""
    meta = root / CAPTIONS_FILE
    if not meta.is_file():
        return None
    captions: dict[str, str] = {}
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[row["file_name"]] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{meta} line {n} is not a JSON object with file_name and text ({e}): fix the line") \
                from e
    names = [str(f.relative_to(root)) for f in files]
    missing = [name for name in names if name not in captions]
    if missing:
        raise ValueError(f"{meta} has no caption for {len(missing)} images (e.g. {missing[:3]}): add a line "
                         '{"file_name": ..., "text": ...} for each, or remove metadata.jsonl to use no captions')
    return [captions[name] for name in names]


class RealImages:
    """Real samples as the teacher's latents (each image center-cropped and resized to the teacher's resolution,
    encoded once, cached as `<cache_dir>/real_latents.safetensors`) with their captions, if any."""

    def __init__(self, images, teacher: Teacher, cache_dir: str | os.PathLike) -> None:
        """`images`: an ImageFolderDataset or ImageShards (open_images)."""
        self.captions = images.captions
        key = hashlib.sha256(json.dumps({"files": images.keys, "teacher": teacher.identity,
                                         "shape": list(teacher.sample_shape)}).encode()).hexdigest()[:16]
        cache = Path(cache_dir) / "real_latents.safetensors"
        if cache.is_file() and (cache.with_suffix(".json")).is_file() and \
                json.loads(cache.with_suffix(".json").read_text()).get("key") == key:
            self.latents = load_file(str(cache))["latents"]
        else:
            self.latents = encode_images(images.samples(), teacher)
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_tensors_atomic({"latents": self.latents.contiguous()}, cache)
            write_atomic(cache.with_suffix(".json"), json.dumps({"key": key}))

    def __len__(self) -> int:
        return len(self.latents)

    def draw(self, n: int, device: torch.device) -> tuple[Tensor, list[str] | None]:
        """n random real latents and their captions (None when the folder has none)."""
        idx = torch.randint(0, len(self.latents), (n,))
        captions = [self.captions[int(i)] for i in idx] if self.captions is not None else None
        return self.latents[idx].to(device), captions


@torch.no_grad()
def encode_images(images: Iterator, teacher: Teacher, batch_size: int = 16) -> Tensor:
    """Encode RGB PIL images (streamed: `batch_size` at a time in memory) with the teacher's VAE at the teacher's
    resolution (center crop, Lanczos resize)."""
    import numpy as np
    from PIL import Image

    if not teacher.makes_images:
        raise ValueError(f"real images need a latent teacher with a VAE; the {type(teacher).__name__} teacher has "
                         "none")
    vae = teacher.pipe.vae
    size = teacher.sample_shape[-1] * teacher.pipe.vae_scale_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out, batch = [], []

    def encode() -> None:
        x = torch.stack(batch).float().div(127.5).sub(1).to(vae.device, vae.dtype)
        latents = vae.encode(x).latent_dist.sample()
        out.append(((latents - shift) * vae.config.scaling_factor).float().cpu())
        batch.clear()

    for img in images:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
        batch.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
        if len(batch) == batch_size:
            encode()
    if batch:
        encode()
    return torch.cat(out)
