"""Files: atomic writes (a temporary sibling renamed into place, so an interruption leaves nothing half-written)
and safe loading of weights (safetensors, or torch.load(weights_only=True); a pickle that holds Python objects
beyond tensors is refused, because unpickling it could run arbitrary code)."""
from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


class UnsafeFileError(ValueError):
    """A file would need full unpickling (arbitrary code) to load."""


def refuse_pickle(path: str | os.PathLike, error: Exception) -> UnsafeFileError:
    return UnsafeFileError(f"{path} holds pickled Python objects, not only tensors; refusing to load it (unpickling "
                           f"can run arbitrary code: {error.__class__.__name__}). Use a safetensors file, or convert "
                           "this one where you trust its origin")


def load_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a .safetensors file or a tensors-only torch file (.bin/.pt/.pth/.ckpt)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} does not exist")
    if p.suffix == ".safetensors":
        return load_file(str(p))
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise refuse_pickle(p, e) from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UnsafeFileError(f"{p} is not a state dict of tensors (got {type(state).__name__})")
    return state


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file through a temporary sibling and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def save_tensors_atomic(tensors: dict[str, Tensor], path: str | os.PathLike) -> Path:
    """Write a safetensors file through a temporary sibling (unique to this process) and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable_by_all(folder: str | os.PathLike) -> None:
    """Give every file and folder under `folder` the modes a plain `open` would (0666 / 0777 less the umask):
    safetensors writes through a private temporary file, which leaves weights readable by their owner only."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder to fill; on success it replaces `path` (with ordinary file modes),
    on any error or interruption it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        readable_by_all(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
