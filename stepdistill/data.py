"""Data sources: what a batch's conditions are, and caches of teacher ODE pairs as safetensors shards."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
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
    """Maps condition indices to the teacher's conditioning: class labels (GMM) or prompts (text teachers)."""

    def __init__(self, teacher: Teacher, prompts: Sequence[str] | None = None) -> None:
        self.teacher = teacher
        self.num_classes = int(getattr(teacher, "num_classes", 0))
        self.prompts = list(prompts) if prompts is not None else None
        if self.prompts is not None and not self.prompts:
            raise ValueError("the prompt list is empty: give a prompts file with one prompt per line")

    def __len__(self) -> int:
        if self.prompts is not None:
            return len(self.prompts)
        return max(self.num_classes, 1)

    def encode(self, index: Tensor) -> Cond:
        if self.prompts is not None:
            return self.teacher.encode([self.prompts[int(i)] for i in index])
        return self.teacher.encode(index.cpu() if self.num_classes else torch.zeros_like(index.cpu()))


def read_prompts(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist: give a text file with one prompt per line")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {p} holds no prompt: write one prompt per line")
    return prompts


class ConditionDataset(Dataset):
    """Items {"cond_index": i mod len(source)}: an epoch visits every condition equally often."""

    def __init__(self, num_sources: int, length: int = 1 << 20) -> None:
        self.num_sources, self.length = num_sources, max(length, num_sources)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"cond_index": torch.tensor(i % self.num_sources)}


class PairDataset(Dataset):
    """Cached teacher ODE pairs: the noise z, the teacher's endpoint x0 and the condition index."""

    def __init__(self, directory: str | os.PathLike) -> None:
        shards = sorted(Path(directory).glob("pairs-*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"no pair shards (pairs-*.safetensors) in {directory}")
        parts = [load_file(s) for s in shards]
        self.tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def __len__(self) -> int:
        return len(self.tensors["noise"])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


@torch.no_grad()
def generate_pairs(teacher: Teacher, source: ConditionSource, directory: str | os.PathLike, num_pairs: int,
                   num_steps: int, guidance: float, seed: int, batch_size: int = 1024, shard_size: int = 8192,
                   device: torch.device | str = "cpu", state_timesteps: list[int] | None = None) -> Path:
    """Run the teacher's ODE sampler from fixed noise and cache (noise, x0, cond_index) in safetensors shards.
    With `state_timesteps` (descending), the sampler runs over exactly those timesteps and the states x_t at each
    of them are cached too ("states", [n, len(state_timesteps), ...]): points on the teacher's trajectories.

    The cache is written to a temporary folder and renamed into place, so an interrupted run leaves nothing
    half-written; an existing cache made with the same teacher and settings is reused."""
    directory = Path(directory)
    settings = {"teacher": getattr(teacher, "identity", type(teacher).__name__), "steps": num_steps,
                "guidance": guidance, "seed": seed, "conditions": len(source), "states": state_timesteps}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    meta = {"key": key, "num_pairs": num_pairs}
    if (directory / "meta.json").is_file() and json.loads((directory / "meta.json").read_text()) == meta:
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    buffers: dict[str, list[Tensor]] = {"noise": [], "x0": [], "cond_index": []}
    if state_timesteps:
        buffers["states"] = []
    shard, done = 0, 0
    while done < num_pairs:
        n = min(batch_size, num_pairs - done)
        index = torch.randint(0, len(source), (n,), generator=g)
        noise = torch.randn((n, *teacher.sample_shape), generator=g)
        cond = source.encode(index).to(device)
        if state_timesteps:
            states = [x.cpu() for x in teacher.ode_states(noise.to(device), cond, state_timesteps, guidance)]
            buffers["states"].append(torch.stack(states[:-1], dim=1))
            x0 = states[-1]
        else:
            x0 = teacher.sample(noise.to(device), cond, num_steps, guidance).cpu()
        for k, v in (("noise", noise), ("x0", x0), ("cond_index", index)):
            buffers[k].append(v)
        done += n
        if sum(len(b) for b in buffers["noise"]) >= shard_size or done == num_pairs:
            save_file({k: torch.cat(v).contiguous() for k, v in buffers.items()},
                      str(tmp / f"pairs-{shard:05d}.safetensors"))
            buffers = {k: [] for k in buffers}
            shard += 1
    (tmp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageFolderDataset(Dataset):
    """Real images from a folder, every file decoded once up front: unreadable files, and files whose size is not
    `resolution` x `resolution` (when set), are refused with a list of them, or skipped and counted."""

    def __init__(self, directory: str | os.PathLike, resolution: int = 0, policy: str = "refuse") -> None:
        from PIL import Image

        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"data.image_dir {root} does not exist: give a folder of images")
        self.files: list[Path] = []
        self.skipped: dict[str, list[str]] = {"unreadable": [], "mis-sized": []}
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(path) as img:
                    img.load()
                    size = img.size
            except (OSError, ValueError, Image.DecompressionBombError):
                self.skipped["unreadable"].append(str(path))
                continue
            if resolution and size != (resolution, resolution):
                self.skipped["mis-sized"].append(f"{path} ({size[0]}x{size[1]})")
                continue
            self.files.append(path)
        bad = [f"{reason}: {f}" for reason, files in self.skipped.items() for f in files]
        if bad and policy == "refuse":
            shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
            expected = f" (expected {resolution}x{resolution})" if resolution else ""
            raise ValueError(f"data.image_dir {root} has {len(bad)} bad files{expected}: {shown}. Fix or remove "
                             "them, or set data.bad_images=skip to train without them")
        if not self.files:
            raise ValueError(f"data.image_dir {root} holds no usable image ({', '.join(IMAGE_SUFFIXES)}; "
                             f"{len(bad)} skipped)")
        self.resolution = resolution

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        """{"image": [3, H, W] in [-1, 1]}."""
        import numpy as np
        from PIL import Image

        with Image.open(self.files[i]) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.float32)
        return {"image": torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0}


def load_real_latents(spec: str, teacher: Teacher, cache: str | os.PathLike | None = None) -> Tensor:
    """Real samples for a GAN term as latents: a .safetensors file with a `latents` tensor, or a folder of
    images encoded once with the teacher's VAE (cached next to the folder as latents.safetensors)."""
    path = Path(spec)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"real-data latent cache {path} does not exist")
        latents = load_file(str(path)).get("latents")
        if latents is None:
            raise ValueError(f"{path} holds no tensor named 'latents'")
    elif path.is_dir():
        cache_file = Path(cache) if cache else path / "latents.safetensors"
        if cache_file.is_file():
            latents = load_file(str(cache_file))["latents"]
        else:
            latents = encode_image_folder(path, teacher)
            save_file({"latents": latents.contiguous()}, str(cache_file))
    else:
        raise FileNotFoundError(f"real data {spec!r} is neither a .safetensors latent file nor an image folder")
    if tuple(latents.shape[1:]) != tuple(teacher.sample_shape):
        raise ValueError(f"real latents have shape {tuple(latents.shape[1:])} but the teacher's latents are "
                         f"{tuple(teacher.sample_shape)}: re-encode the images at the teacher's resolution")
    return latents.float()


@torch.no_grad()
def encode_image_folder(folder: Path, teacher: Teacher, batch_size: int = 16) -> Tensor:
    """Encode every image of a folder with the teacher's VAE at the teacher's resolution (center crop)."""
    import numpy as np
    from PIL import Image

    vae = getattr(getattr(teacher, "pipe", None), "vae", None)
    if vae is None:
        raise ValueError("encoding an image folder needs a latent teacher with a VAE")
    scale = teacher.pipe.vae_scale_factor
    size = teacher.sample_shape[-1] * scale
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    if not files:
        raise FileNotFoundError(f"image folder {folder} holds no .png/.jpg/.jpeg/.webp file")
    out = []
    for i in range(0, len(files), batch_size):
        images = []
        for f in files[i:i + batch_size]:
            img = Image.open(f).convert("RGB")
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
            images.append(torch.from_numpy(np.asarray(img)).permute(2, 0, 1))
        x = torch.stack(images).float().div(127.5).sub(1).to(vae.device, vae.dtype)
        latents = vae.encode(x).latent_dist.sample()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        out.append(((latents - shift) * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)
