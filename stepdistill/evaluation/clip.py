"""CLIP score through torchmetrics' `CLIPScore` (100 * max(cos(image, text), 0), averaged), with a configurable
model: a hub id (needs the hub or its cache) or a local folder holding a CLIPModel and a CLIPProcessor."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # torchmetrics' default


class _FeatureTensors(torch.nn.Module):
    """A CLIPModel whose get_{image,text}_features return tensors: transformers 5 returns output objects (the
    projected features in `pooler_output`), which torchmetrics 1.9 can't normalize."""

    def __init__(self, clip) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


def load_clip_score(model: str = DEFAULT_CLIP):
    """torchmetrics' CLIPScore on a hub id or a local folder (a CLIPModel and CLIPProcessor saved there)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    local = Path(model).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"CLIP model folder {local} holds no config.json (save a CLIPModel and its "
                                "CLIPProcessor there with save_pretrained)")
    source = str(local) if local.exists() else model
    try:
        return CLIPScore(model_name_or_path=lambda: (_FeatureTensors(CLIPModel.from_pretrained(source)),
                                                     CLIPProcessor.from_pretrained(source)))
    except OSError as e:
        raise FileNotFoundError(f"CLIP model {model!r} could not be loaded ({e}); offline, pass a local folder with "
                                "--clip-model PATH") from e


@torch.no_grad()
def clip_score(images01: Tensor, prompts: list[str], model: str = DEFAULT_CLIP, batch_size: int = 64) -> float:
    """Mean CLIP score of float images [N, 3, H, W] in [0, 1] against their prompts."""
    if len(images01) != len(prompts):
        raise ValueError(f"{len(images01)} images but {len(prompts)} prompts")
    metric = load_clip_score(model)
    for i in range(0, len(prompts), batch_size):
        u8 = (images01[i:i + batch_size].clamp(0, 1) * 255).round().to(torch.uint8)
        metric.update(u8, prompts[i:i + batch_size])
    return float(metric.compute())
