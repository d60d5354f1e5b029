"""The classifier of a miniature world: a small CNN whose 64 pre-activation features are the feature space of its
FID and whose predictions give prompt accuracy (the miniature analogue of CLIP score)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepdistill.miniature.dataset import MiniatureDataset


class MiniatureClassifier(nn.Module):
    """Two conv + pool stages on S x S RGB images in [0, 1]; `features` are the 64 units before the ReLU that
    feeds the logits (pre-activation, so none are dead)."""

    feature_dim = 64

    def __init__(self, num_classes: int, image_size: int = 16) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.fc = nn.Linear(64 * (image_size // 4) ** 2, self.feature_dim)
        self.out = nn.Linear(self.feature_dim, num_classes)

    def features(self, images: Tensor) -> Tensor:
        return self.fc(self.conv(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.out(F.relu(self.features(images)))


def blur(images: Tensor, sigma: Tensor, radius: int = 3) -> Tensor:
    """Separable Gaussian blur of images [N, C, H, W] with a standard deviation per image (pixels; 0: identity),
    edges replicated. Training on mildly blurred copies makes the classifier read a teacher's slightly soft
    samples as a person would, while a shape melted into a blob (sigma 2) still reads wrong."""
    k = torch.arange(-radius, radius + 1, dtype=images.dtype)
    w = torch.exp(-k[None] ** 2 / (2 * sigma[:, None].clamp(min=1e-3).to(images.dtype) ** 2))
    w = (w / w.sum(1, keepdim=True))[:, :, None, None, None]  # [N, taps, 1, 1, 1]
    h, width = images.shape[-2:]
    padded = F.pad(images, (radius,) * 4, mode="replicate")
    rows = sum(w[:, i] * padded[..., i:i + width] for i in range(2 * radius + 1))
    return sum(w[:, i] * rows[..., i:i + h, :] for i in range(2 * radius + 1))


def train_classifier(dataset: MiniatureDataset, seed: int = 0, epochs: int | None = None
                     ) -> tuple[MiniatureClassifier, float]:
    """Train on the train split (with the dataset's random shifts); returns (model, held-out test accuracy)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = dataset.load_images("train")
    model = MiniatureClassifier(dataset.num_classes, dataset.image_size)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    shift, blur_sigma, noise = dataset.classifier_shift, dataset.classifier_blur, dataset.classifier_noise
    for _ in range(epochs or dataset.classifier_epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            batch = x[idx]
            if shift:
                batch = torch.roll(batch, shifts=torch.randint(-shift, shift + 1, (2,), generator=g).tolist(),
                                   dims=(2, 3))
            if blur_sigma:
                batch = blur(batch, torch.rand(len(batch), generator=g) * blur_sigma)
            if noise:
                batch = batch + torch.randn(batch.shape, generator=g) * noise * torch.rand(len(batch), 1, 1, 1,
                                                                                           generator=g)
            loss = F.cross_entropy(model(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xt, yt = dataset.load_images("test")
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    return model, acc


def save_classifier(model: MiniatureClassifier, folder: str | Path, info: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "info.json").write_text(json.dumps(info, indent=2))


def load_classifier(folder: str | Path) -> MiniatureClassifier:
    """A saved classifier; its class count and image size are read off the weights' shapes."""
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no miniature classifier at {path}: build it with `stepdistill teacher NAME`")
    state = load_file(str(path))
    num_classes = state["out.weight"].shape[0]
    image_size = 4 * round((state["fc.weight"].shape[1] / 64) ** 0.5)
    model = MiniatureClassifier(num_classes, image_size)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


class ClassifierFeatures(nn.Module):
    """A classifier as a FID feature module: images (uint8 in [0, 255], or floats in [0, 255] as clean-fid feeds
    them) of any size -> its 64 pre-activation features, resized with antialiasing to its resolution first."""

    num_features = MiniatureClassifier.feature_dim

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        self.classifier = load_classifier(folder)
        self.image_size = 4 * round((self.classifier.fc.in_features / 64) ** 0.5)

    def prepare(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(self.prepare(images))

    @torch.no_grad()
    def predict(self, images01: Tensor) -> Tensor:
        """Class predictions for float images in [0, 1]."""
        return self.classifier(self.prepare(images01 * 255.0)).argmax(1)
