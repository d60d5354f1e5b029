"""Caches of teacher ODE pairs (noise z, the teacher's endpoint x0, the condition index, optionally the states on
the way) as safetensors shards: generated once, keyed by everything that determines them.

Pair i's condition and noise come from a random stream seeded by (seed, i) alone, and shard k always holds pairs
k*S .. (k+1)*S - 1 computed in the same batches, so the cache is the same bit for bit whichever process computes
which shard. Shards are written one by one, each atomically, into `<dir>.partial`; an interrupted generation keeps
its finished shards there and the next one computes only the missing ones; the folder becomes `<dir>` in one
rename when every shard is there. Under `split_across(...)` the missing shards are divided among processes."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from stepdistill.data.conditions import ConditionSource
from stepdistill.io import readable_by_all, save_tensors_atomic, write_atomic
from stepdistill.teachers.base import Teacher

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"  # in `<dir>.partial`: what the shards there belong to
NOISE = "per-index"  # how noise is drawn; part of the cache key, so caches drawn otherwise are not reused


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


@dataclass
class PairProcesses:
    """How pair generation is split: this process's index among `count`, a barrier across them, the sizes of
    shards and teacher batches, and the caches made (filled in by generate_pairs)."""

    index: int = 0
    count: int = 1
    barrier: Callable[[], None] = lambda: None
    shard_size: int = 8192
    batch_size: int = 1024
    made: list[Path] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.index == 0


_PROCESSES: ContextVar[PairProcesses | None] = ContextVar("pair_processes", default=None)


@contextmanager
def split_across(processes: PairProcesses) -> Iterator[PairProcesses]:
    """Every generate_pairs call inside divides its shards among `processes` (each process calls it)."""
    token = _PROCESSES.set(processes)
    try:
        yield processes
    finally:
        _PROCESSES.reset(token)


def pair_stream(seed: int, index: int) -> torch.Generator:
    """The random stream of pair `index`: a 64-bit hash of (seed, index), so no two pairs share one."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def draw_pairs(seed: int, start: int, stop: int, num_conditions: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(condition indices [n], noise [n, *shape]) of pairs start..stop-1, each from its own stream."""
    index, noise = torch.empty(stop - start, dtype=torch.long), torch.empty((stop - start, *shape))
    for row, i in enumerate(range(start, stop)):
        g = pair_stream(seed, i)
        index[row] = torch.randint(0, num_conditions, (1,), generator=g)
        noise[row] = torch.randn(shape, generator=g)
    return index, noise


def shard_name(k: int) -> str:
    return f"pairs-{k:05d}.safetensors"


@torch.no_grad()
def make_shard(teacher: Teacher, source: ConditionSource, cfg, start: int, stop: int, device, batch_size: int,
               state_timesteps: list[float] | None, bar: tqdm) -> dict[str, Tensor]:
    """The pairs start..stop-1: noise, the teacher's x0 (and states), condition indices."""
    out: dict[str, list[Tensor]] = {"noise": [], "x0": [], "cond_index": [], **({"states": []} if state_timesteps
                                                                                 else {})}
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        index, noise = draw_pairs(cfg.seed, lo, hi, len(source), tuple(teacher.sample_shape))
        cond = source.encode(index).to(device)
        if state_timesteps:
            states = [x.cpu() for x in teacher.ode_states(noise.to(device), cond, state_timesteps, cfg.guidance)]
            out["states"].append(torch.stack(states[:-1], dim=1))
            x0 = states[-1]
        else:
            x0 = teacher.sample(noise.to(device), cond, cfg.steps, cfg.guidance).cpu()
        for k, v in (("noise", noise), ("x0", x0), ("cond_index", index)):
            out[k].append(v)
        bar.update(hi - lo)
    return {k: torch.cat(v).contiguous() for k, v in out.items()}


def _complete(directory: Path, meta: dict) -> bool:
    return (directory / "meta.json").is_file() and json.loads((directory / "meta.json").read_text()) == meta


def _start_partial(partial: Path, plan: dict) -> None:
    """Keep the finished shards of an interrupted generation with the same plan; start afresh otherwise."""
    if (partial / PLAN_FILE).is_file() and json.loads((partial / PLAN_FILE).read_text()) == plan:
        for stray in partial.glob(".*.tmp"):  # a shard whose write was cut short
            stray.unlink()
        kept = len(list(partial.glob("pairs-*.safetensors")))
        if kept:
            logger.info("teacher pairs: continuing from %d finished shards in %s", kept, partial)
        return
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_atomic(partial / PLAN_FILE, json.dumps(plan))


@contextmanager
def exclusive(folder: Path, held: bool) -> Iterator[None]:
    """An exclusive lock on `folder` (flock on the folder itself: no lock file is left behind) while `held`:
    independent runs that share one pair folder (a sweep's seeds) make a cache once, the others wait and reuse it.
    The lock is the caches' parent, so runs making different caches beside each other take turns."""
    if not held:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("teacher pairs: another run is writing to %s; waiting for it", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@torch.no_grad()
def generate_pairs(teacher: Teacher, source: ConditionSource, cfg, output_dir: str | os.PathLike,
                   device: torch.device | str = "cpu", state_timesteps: list[float] | None = None) -> Path:
    """Run the teacher's ODE sampler from per-pair seeded noise (a PairsConfig: num, steps, guidance, seed, dir) and
    cache (noise, x0, cond_index) in safetensors shards. With `state_timesteps` (descending) the sampler runs over
    exactly those timesteps and the states x_t at each of them are cached too ("states", [n, len(state_timesteps),
    ...]).

    An existing cache made with the same teacher, conditions and settings is reused; meta.json records the key and
    the settings (teacher, sampler, steps, CFG, seed). Inside `split_across` every process calls this and computes
    its share of the missing shards; progress (with an ETA) shows on the first process only."""
    procs = _PROCESSES.get() or PairProcesses()
    directory = pair_dir(cfg, output_dir)
    settings = {"teacher": teacher.identity or type(teacher).__name__, "steps": cfg.steps,
                "guidance": cfg.guidance, "seed": cfg.seed, "conditions": source.identity(),
                "shape": list(teacher.sample_shape), "states": state_timesteps, "noise": NOISE}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    # how the pairs were made, readable in meta.json (the conditions by count: a prompt list may be long)
    recipe = {**{k: v for k, v in settings.items() if k != "conditions"}, "num_conditions": len(source),
              "sampler": "DDIM (trailing)" if teacher.schedule.kind == "vp" else "flow Euler"}
    meta = {"key": key, "num_pairs": cfg.num, "recipe": recipe}
    procs.made.append(directory)
    with exclusive(directory.parent, procs.is_main):
        procs.barrier()  # the main process holds the lock: every process sees the cache as it stands
        if _complete(directory, meta):
            return directory
        partial = directory.with_name(directory.name + ".partial")
        shards = math.ceil(cfg.num / procs.shard_size)
        if procs.is_main:
            _start_partial(partial, {"key": key, "num_pairs": cfg.num, "shard_size": procs.shard_size})
        procs.barrier()
        missing = [k for k in range(shards) if not (partial / shard_name(k)).is_file()]
        procs.barrier()  # every process has listed the same missing shards before any is written
        mine = missing[procs.index::procs.count]
        bounds = {k: (k * procs.shard_size, min((k + 1) * procs.shard_size, cfg.num)) for k in mine}
        progress = {} if procs.is_main else {"disable": True}
        with tqdm(total=sum(hi - lo for lo, hi in bounds.values()), desc="teacher pairs", unit="pair",
                  **progress) as bar:
            try:
                for k, (lo, hi) in bounds.items():
                    save_tensors_atomic(make_shard(teacher, source, cfg, lo, hi, device, procs.batch_size,
                                                   state_timesteps, bar), partial / shard_name(k))
            except BaseException:
                done = len(list(partial.glob("pairs-*.safetensors")))
                logger.warning("teacher pairs stopped: %d of %d shards are finished in %s; the same command computes "
                               "only the others", done, shards, partial)
                raise
        procs.barrier()
        absent = [shard_name(k) for k in range(shards) if not (partial / shard_name(k)).is_file()]
        if absent:  # every process sees it, so none waits for the others
            raise RuntimeError(f"{len(absent)} pair shards (e.g. {absent[0]}) are not in {partial} after every process "
                               "finished: on several machines the pair folder must be on storage they all see (set "
                               "objective.pairs.dir to one)")
        procs.barrier()  # every process has checked before the folder is renamed
        if procs.is_main:
            (partial / PLAN_FILE).unlink()
            write_atomic(partial / "meta.json", json.dumps(meta))
            readable_by_all(partial)
            shutil.rmtree(directory, ignore_errors=True)
            partial.rename(directory)
        procs.barrier()
        return directory
