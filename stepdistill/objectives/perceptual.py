"""LPIPS (Zhang et al. 2018) as a distillation distance for students of image-making teachers: the one-step
distillation of rectified flow (Liu et al. 2023 code: LPIPS-VGG), InstaFlow's second distillation stage (LPIPS on
VAE-decoded images) and SlimFlow's Flow-Guided Distillation (LPIPS-VGG on images resized to 64 x 64).

The calibrated linear heads ship with torchmetrics; the VGG16 / AlexNet backbone is torchvision's ImageNet
weights, which must already be in the torch hub cache when there is no network. Without them a run stops before
training and says so: it never falls back to L2.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from stepdistill.config.schema import ConfigError

LPIPS_NETS = ("vgg", "alex")
MIN_SIDE = 64  # SlimFlow's lpips_forward_wrapper: bilinear resize to 64 x 64; larger images are kept as they are


def backbone_weights_file(net: str) -> Path:
    """Where torchvision keeps the ImageNet weights of LPIPS' backbone `net` (vgg | alex)."""
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    url = (VGG16_Weights if net == "vgg" else AlexNet_Weights).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def check_lpips_available(net: str, key: str = "objective.loss") -> None:
    """ConfigError naming the missing file unless LPIPS-`net` can be built without a download."""
    if net not in LPIPS_NETS:
        raise ConfigError(f"objective.lpips_net: {net!r} is not one of {list(LPIPS_NETS)}")
    weights = backbone_weights_file(net)
    if not weights.is_file():
        raise ConfigError(f"{key}=lpips: LPIPS is unavailable here: the {net} backbone's ImageNet weights "
                          f"({weights.name}) are not in the torch hub cache {weights.parent}. Put the file there "
                          f"(torchvision downloads it where there is network), or set {key}=l2")


class LPIPSDistance(nn.Module):
    """Mean LPIPS between two image batches in [0, 1]; frozen, always in eval mode, gradients reach the inputs."""

    def __init__(self, net: str = "vgg") -> None:
        super().__init__()
        check_lpips_available(net)
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.metric = LearnedPerceptualImagePatchSimilarity(net_type=net).requires_grad_(False).eval()

    def forward(self, images: Tensor, target: Tensor) -> Tensor:
        if images.shape[-1] < MIN_SIDE:
            size = (MIN_SIDE, MIN_SIDE)
            images = nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
            target = nn.functional.interpolate(target, size=size, mode="bilinear", align_corners=False)
        return self.metric.net(images.float(), target.float(), normalize=True).mean()


def image_distance(lpips: LPIPSDistance | None, teacher, x: Tensor, target: Tensor) -> Tensor:
    """L2 between latents (lpips None), else LPIPS between their VAE decodings (the target without gradient)."""
    if lpips is None:
        return nn.functional.mse_loss(x.float(), target.float())
    with torch.no_grad():
        target_images = teacher.decode(target)
    return lpips(teacher.decode(x), target_images)
