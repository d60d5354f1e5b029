"""The generator's exponential moving average: diffusers' EMAModel over the trainable generator parameters, saved
as safetensors (its own state_dict would be pickled by accelerate). Over a sharded generator (FSDP2) the
parameters and so the averages are DTensors: each process keeps and saves its shard (torch.distributed.checkpoint,
a folder instead of the file)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

EMA_FILE = "ema.safetensors"
EMA_SHARDS = "ema"  # the torch.distributed.checkpoint folder of a sharded EMA


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

    @property
    def sharded(self) -> bool:
        return any(isinstance(s, DTensor) for s in self.model.shadow_params)

    def all_finite(self) -> bool:
        """Whether this process's averages (its shards, when sharded) are finite."""
        return all(torch.isfinite(s.to_local() if isinstance(s, DTensor) else s).all()
                   for s in self.model.shadow_params)

    def _sharded_state(self) -> dict:
        return {"shadow": {str(i): s for i, s in enumerate(self.model.shadow_params)},
                "optimization_step": torch.tensor(self.model.optimization_step)}

    def save_sharded(self, folder: Path) -> None:
        """Every process writes its shards into `folder` (a collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(), checkpoint_id=str(folder))

    def load_sharded(self, folder: Path) -> None:
        """Read the shards this process holds from `folder`, whatever the process count that wrote it (a
        collective; without a process group, e.g. for export, the whole averages)."""
        import torch.distributed.checkpoint as dcp

        if not folder.is_dir():
            raise ValueError(f"{folder.parent} holds no sharded EMA state ({EMA_SHARDS}/): it was written with "
                             "train.ema_decay=0 or without FSDP; resume with the settings that wrote it")
        state = self._sharded_state()
        dcp.load(state, checkpoint_id=str(folder), no_dist=not torch.distributed.is_initialized())
        self.model.optimization_step = int(state["optimization_step"])

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
