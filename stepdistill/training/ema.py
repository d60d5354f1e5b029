"""The generator's exponential moving average: diffusers' EMAModel over the trainable generator parameters, saved
as safetensors (its own state_dict would be pickled by accelerate)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

EMA_FILE = "ema.safetensors"


class GeneratorEMA:
    def __init__(self, parameters: list[nn.Parameter], decay: float) -> None:
        from diffusers.training_utils import EMAModel

        self.parameters = parameters
        self.model = EMAModel(parameters, decay=decay)

    @property
    def optimization_step(self) -> int:
        """How many updates the average has taken."""
        return self.model.optimization_step

    def step(self) -> None:
        self.model.step(self.parameters)

    def copy_to_model(self) -> None:
        """Put the EMA weights into the generator for good (export)."""
        self.model.copy_to(self.parameters)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The generator computes with the EMA weights inside the block (previews), its own weights after."""
        self.model.store(self.parameters)
        self.model.copy_to(self.parameters)
        try:
            yield
        finally:
            self.model.restore(self.parameters)

    def all_finite(self) -> bool:
        return all(torch.isfinite(s).all() for s in self.model.shadow_params)

    def save(self, path: Path) -> None:
        save_file({f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.model.shadow_params)},
                  str(path), metadata={"optimization_step": str(self.model.optimization_step)})

    def load(self, path: Path) -> None:
        if not path.is_file():
            raise ValueError(f"{path.parent} holds no EMA state ({EMA_FILE}): it was written with train.ema_decay=0; "
                             "resume with that setting or start a new run")
        tensors = load_file(str(path))
        if len(tensors) != len(self.model.shadow_params):
            raise ValueError(f"{path} holds {len(tensors)} EMA tensors, this model has {len(self.model.shadow_params)}")
        with torch.no_grad():
            for i, p in enumerate(self.model.shadow_params):
                p.copy_(tensors[f"shadow.{i}"])
        with safe_open(str(path), "pt") as f:
            self.model.optimization_step = int(f.metadata()["optimization_step"])
