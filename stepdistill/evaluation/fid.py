"""FID with a switchable backend: clean-fid (modes clean / legacy_tensorflow / legacy_pytorch) or torchmetrics'
`FrechetInceptionDistance`. The feature network is an argument: the backend's Inception (the standard; its weights
must be downloadable or cached) when none is given, or any feature module (such as a miniature world's classifier,
`stepdistill.miniature.classifier.ClassifierFeatures`). Reference statistics are computed once and cached."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

BACKENDS = ("cleanfid", "torchmetrics")
MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class FIDProtocol:
    backend: str = "cleanfid"
    mode: str = "clean"  # clean-fid's resize mode; torchmetrics resizes inside its Inception (antialiased bilinear)
    feature: str = "inception"  # inception, or the name of the feature module passed along (for the records)
    inception_weights: str = ""  # a local Inception weights file (torchmetrics: FID weights .pth)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"FID backend {self.backend!r} is not one of {BACKENDS}")
        if self.mode not in MODES:
            raise ValueError(f"FID mode {self.mode!r} is not one of {MODES}")


class MissingWeightsError(FileNotFoundError):
    """Inception weights are neither cached nor downloadable."""


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_images(folder: str | Path, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Tensor:
    """All images of a folder (sorted by path) as uint8 [N, 3, H, W], after `transform` (HWC uint8 -> HWC uint8);
    they must share one size."""
    from PIL import Image

    transform = transform or (lambda a: a)
    arrays = [transform(np.asarray(Image.open(p).convert("RGB"))) for p in list_images(folder)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), clean-fid's formula."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    return float(cleanfid_frechet(mu1, sigma1, mu2, sigma2))


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


# ---------------------------------------------------------------------------------------------- feature models
def inception_extractor(protocol: FIDProtocol) -> nn.Module:
    """The backend's own Inception; a clear error when its weights can't be fetched offline."""
    try:
        if protocol.backend == "cleanfid":
            from cleanfid.features import build_feature_extractor

            return build_feature_extractor(protocol.mode, torch.device("cpu"), use_dataparallel=False)
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=protocol.inception_weights or None)
    except Exception as e:  # the download fails in many ways (URLError, HTTPError, ModuleNotFoundError, ...)
        raise MissingWeightsError(
            f"the Inception network of the {protocol.backend} backend could not be loaded ({type(e).__name__}: {e}). "
            "It needs its weights: download them once where there is internet (clean-fid caches "
            "inception-2015-12-05.pt in /tmp; torchmetrics needs torch-fidelity and its FID weights, or "
            "--inception-weights PATH), or use an offline feature model such as --feature digits or --feature "
            "shapes") from e


def feature_model(protocol: FIDProtocol, module: nn.Module | None = None) -> nn.Module:
    """`module` when given, else the backend's Inception (protocol.feature must then be inception)."""
    if module is not None:
        return module
    if protocol.feature == "inception":
        return inception_extractor(protocol)
    raise ValueError(f"FID feature {protocol.feature!r} needs its feature module passed along (module=...); only "
                     "inception is built here")


# ---------------------------------------------------------------------------------------------- features
@torch.no_grad()
def folder_features(folder: str | Path, protocol: FIDProtocol, module: nn.Module | None = None,
                    batch_size: int = 64, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Features of every image of `folder` exactly as the backend computes them."""
    model = feature_model(protocol, module)
    if protocol.backend == "cleanfid":
        from cleanfid.fid import get_folder_features

        list_images(folder)  # a clear error for a missing or empty folder
        return get_folder_features(str(folder), model, num_workers=0, batch_size=batch_size,
                                   device=torch.device("cpu"), mode=protocol.mode, verbose=False,
                                   custom_image_tranform=transform)
    images = load_images(folder, transform)
    return torch.cat([model(chunk).reshape(len(chunk), -1).double() for chunk in images.split(batch_size)]).numpy()


def folder_key(folder: str | Path, protocol: FIDProtocol, extra: str = "") -> str:
    """A hash of the folder's files (names, sizes, modification times) and the protocol."""
    h = hashlib.sha256(json.dumps(asdict(protocol), sort_keys=True).encode() + extra.encode())
    for p in list_images(folder):
        st = p.stat()
        h.update(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def reference_statistics(folder: str | Path, protocol: FIDProtocol, module: nn.Module | None = None,
                         cache_dir: str | Path | None = None, transform: Callable | None = None,
                         transform_name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference folder, cached as `<cache_dir>/fid_ref_<hash>.npz` (computed once); the hash
    covers the files, the protocol, the module's class and `transform_name`."""
    cache = None
    if cache_dir is not None:
        name = (type(module).__name__ if module is not None else "") + transform_name
        cache = Path(cache_dir) / f"fid_ref_{folder_key(folder, protocol, name)}.npz"
        if cache.is_file():
            data = np.load(cache)
            return data["mu"], data["sigma"]
    mu, sigma = statistics(folder_features(folder, protocol, module, transform=transform))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, mu=mu, sigma=sigma)
    return mu, sigma


def compute_fid(generated: str | Path, reference: str | Path | tuple[np.ndarray, np.ndarray],
                protocol: FIDProtocol | None = None, module: nn.Module | None = None,
                cache_dir: str | Path | None = None) -> float:
    """FID between a folder of generated images and a reference folder (or its (mu, sigma))."""
    protocol = protocol or FIDProtocol()
    if isinstance(reference, tuple):
        mu_r, sigma_r = reference
    else:
        mu_r, sigma_r = reference_statistics(reference, protocol, module, cache_dir)
    if protocol.backend == "torchmetrics":
        return torchmetrics_fid(load_images(generated), (mu_r, sigma_r), feature_model(protocol, module))
    mu_g, sigma_g = statistics(folder_features(generated, protocol, module))
    return frechet_distance(mu_g, sigma_g, mu_r, sigma_r)


def torchmetrics_fid(images: Tensor, reference: tuple[np.ndarray, np.ndarray], model: nn.Module) -> float:
    """torchmetrics' FrechetInceptionDistance with its real-feature state set from cached statistics
    (`reset_real_features=False`, so the reference survives `reset()` between evaluations)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=model, reset_real_features=False)
    mu, sigma = (torch.as_tensor(a, dtype=torch.float64) for a in reference)
    n = 2  # any n > 1 reproduces (mu, sigma) exactly through the metric's sums
    metric.real_features_sum = mu * n
    metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n)
    for chunk in images.split(64):
        metric.update(chunk, real=False)
    return float(metric.compute())
