"""Caches of teacher ODE pairs (noise z, the teacher's endpoint x0, the condition index, optionally the states on
the way) as safetensors shards: generated once, keyed by everything that determines them, written atomically."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from stepdistill.data.conditions import ConditionSource
from stepdistill.io import atomic_directory
from stepdistill.teachers.base import Teacher


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


def pair_dir(cfg, output_dir: str | os.PathLike) -> Path:
    """Where a pairs section's cache lives: its own `dir`, else <output_dir>/pairs."""
    return Path(cfg.dir) if cfg.dir else Path(output_dir) / "pairs"


@torch.no_grad()
def generate_pairs(teacher: Teacher, source: ConditionSource, cfg, output_dir: str | os.PathLike,
                   device: torch.device | str = "cpu", state_timesteps: list[float] | None = None,
                   batch_size: int = 1024, shard_size: int = 8192) -> Path:
    """Run the teacher's ODE sampler from fixed noise (a PairsConfig: num, steps, guidance, seed, dir) and cache
    (noise, x0, cond_index) in safetensors shards. With `state_timesteps` (descending) the sampler runs over exactly
    those timesteps and the states x_t at each of them are cached too ("states", [n, len(state_timesteps), ...]).

    An existing cache made with the same teacher, conditions and settings is reused; an interrupted run leaves
    nothing half-written. meta.json records the key and the settings (teacher, sampler, steps, CFG, seed)."""
    directory = pair_dir(cfg, output_dir)
    settings = {"teacher": teacher.identity or type(teacher).__name__, "steps": cfg.steps,
                "guidance": cfg.guidance, "seed": cfg.seed, "conditions": source.identity(),
                "shape": list(teacher.sample_shape), "states": state_timesteps}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    # how the pairs were made, readable in meta.json (the conditions by count: a prompt list may be long)
    recipe = {**{k: v for k, v in settings.items() if k != "conditions"}, "num_conditions": len(source),
              "sampler": "DDIM (trailing)" if teacher.schedule.kind == "vp" else "flow Euler"}
    meta = {"key": key, "num_pairs": cfg.num, "recipe": recipe}
    if (directory / "meta.json").is_file() and json.loads((directory / "meta.json").read_text()) == meta:
        return directory
    g = torch.Generator().manual_seed(cfg.seed)
    buffers: dict[str, list[Tensor]] = {"noise": [], "x0": [], "cond_index": []}
    if state_timesteps:
        buffers["states"] = []
    with atomic_directory(directory) as tmp, tqdm(total=cfg.num, desc="teacher pairs", unit="pair") as bar:
        shard, done = 0, 0
        while done < cfg.num:
            n = min(batch_size, cfg.num - done)
            index = torch.randint(0, len(source), (n,), generator=g)
            noise = torch.randn((n, *teacher.sample_shape), generator=g)
            cond = source.encode(index).to(device)
            if state_timesteps:
                states = [x.cpu() for x in teacher.ode_states(noise.to(device), cond, state_timesteps, cfg.guidance)]
                buffers["states"].append(torch.stack(states[:-1], dim=1))
                x0 = states[-1]
            else:
                x0 = teacher.sample(noise.to(device), cond, cfg.steps, cfg.guidance).cpu()
            for k, v in (("noise", noise), ("x0", x0), ("cond_index", index)):
                buffers[k].append(v)
            done += n
            bar.update(n)
            if sum(len(b) for b in buffers["noise"]) >= shard_size or done == cfg.num:
                save_file({k: torch.cat(v).contiguous() for k, v in buffers.items()},
                          str(tmp / f"pairs-{shard:05d}.safetensors"))
                buffers = {k: [] for k in buffers}
                shard += 1
        (tmp / "meta.json").write_text(json.dumps(meta))
    return directory
