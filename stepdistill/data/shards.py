"""Real images from WebDataset tar shards, read with the `webdataset` package (pip install "stepdistill[webdataset]").

A folder of `*.tar` shards; each sample is an image member (png, jpg, jpeg, webp, bmp) and, for captions, a `txt`
member or a `json` member with "text" (img2dataset's layout). The captions contract is the image folder's: every
usable image has one, or none has. The shards are streamed, never held in memory: one pass checks them (the
bad-file policy, the captions), and encoding streams them again."""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

from stepdistill.data.images import IMAGE_SUFFIXES, ImageFolderDataset, admit_image, refuse_bad_images

IMAGE_MEMBERS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)


def _webdataset():
    try:
        import webdataset
    except ImportError as e:
        raise ValueError("data.image_dir holds WebDataset tar shards, which need the webdataset package: pip install "
                         "'stepdistill[webdataset]' (or pip install webdataset)") from e
    return webdataset


class ImageShards:
    """Real images from a folder of WebDataset tar shards: the same interface as ImageFolderDataset (keys,
    captions, skipped, samples) for RealImages, read as a stream."""

    def __init__(self, directory: str | Path, resolution: int = 0, policy: str = "refuse") -> None:
        self.root = Path(directory)
        self.shards = sorted(self.root.glob("*.tar"))
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in self.root.iterdir()):
            raise ValueError(f"data.image_dir {self.root} holds both image files and WebDataset .tar shards: keep "
                             "one kind in the folder")
        self.resolution = resolution
        self.keys: list[str] = []
        captions: list[str | None] = []
        self.skipped: dict[str, list[str]] = {"unreadable": [], "mis-sized": []}
        for name, sample in self._stream():
            member = next((m for m in IMAGE_MEMBERS if m in sample), None)
            if member is None:
                self.skipped["unreadable"].append(f"{name} (no image member: {', '.join(IMAGE_MEMBERS)})")
                continue
            if not admit_image(io.BytesIO(sample[member]), name, resolution, self.skipped):
                continue
            self.keys.append(name)
            captions.append(caption_of(name, sample))
        bad = refuse_bad_images(self.root, self.skipped, resolution, policy, "samples")
        if not self.keys:
            raise ValueError(f"data.image_dir {self.root} holds no usable image in its shards "
                             f"({', '.join(IMAGE_MEMBERS)} members; {len(bad)} skipped)")
        missing = [k for k, c in zip(self.keys, captions) if c is None]
        if missing and len(missing) < len(self.keys):
            raise ValueError(f"data.image_dir {self.root}: {len(missing)} of {len(self.keys)} samples have no caption "
                             f"(e.g. {missing[:3]}): give every sample a .txt (or .json with \"text\") member, or "
                             "none of them")
        self.captions = None if missing else [str(c) for c in captions]
        self._usable = set(self.keys)

    def _stream(self) -> Iterator[tuple[str, dict]]:
        """(shard/key, sample) over every shard in order; every process reads all of them."""
        wds = _webdataset()
        dataset = wds.WebDataset([str(s) for s in self.shards], shardshuffle=False, nodesplitter=None,
                                 workersplitter=None, empty_check=False)
        for sample in dataset:
            yield f"{Path(sample['__url__']).name}/{sample['__key__']}", sample

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def __len__(self) -> int:
        return len(self.keys)

    def samples(self) -> Iterator:
        """Every usable image, in order, as an RGB PIL image."""
        from PIL import Image

        for name, sample in self._stream():
            if name in self._usable:
                member = next(m for m in IMAGE_MEMBERS if m in sample)
                with Image.open(io.BytesIO(sample[member])) as img:
                    yield img.convert("RGB")


def caption_of(name: str, sample: dict) -> str | None:
    """A sample's caption: its txt member, or the "text" of its json member; None without either."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    if "json" in sample:
        try:
            row = json.loads(sample["json"])
            return str(row["text"]) if "text" in row else None
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"sample {name}: its .json member is not a JSON object ({e}): fix the shard") from e
    return None


def open_images(directory: str | os.PathLike, resolution: int = 0, policy: str = "refuse"):
    """The real images of `data.image_dir`: WebDataset tar shards (ImageShards) when the folder holds `*.tar`
    files, else an image folder (ImageFolderDataset)."""
    root = Path(directory)
    if root.is_dir() and any(root.glob("*.tar")):
        return ImageShards(root, resolution, policy)
    return ImageFolderDataset(root, resolution, policy)
