"""Measured memory: the peak bytes of live tensor storages while code runs, counted at the dispatcher (every ATen
op's outputs, forward, backward and optimizer alike) and freed when a storage dies. Independent of the allocator
and the device: it measures the same quantity on CPU as `torch.cuda.max_memory_allocated` on a GPU, less the
allocator's rounding and the kernels' internal workspaces, and it is what the planner (`perf/memory.py`) estimates."""
from __future__ import annotations

import gc
import warnings
from collections.abc import Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorMemory(TorchDispatchMode):
    """`with LiveTensorMemory() as m: ...` then `m.peak` (bytes). The storages alive on entry are counted from the
    start: those of `alive` where given (e.g. `training_tensors(trainer)`), else every tensor the garbage collector
    knows (the whole process). A storage shared by several tensors (views, tied weights) is counted once. `device`
    restricts the count to one device type."""

    def __init__(self, device: str | None = None, alive: Iterable[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.device, self._alive = device, alive
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage key -> (weak reference, bytes)
        self._total = 0  # bytes of the entries in _live; an upper bound of the live bytes until a sweep
        self.peak = 0

    def __enter__(self) -> LiveTensorMemory:
        for t in _all_tensors() if self._alive is None else self._alive:
            self._track(t)
        self._alive = None
        self.peak = max(self.peak, self.current)
        return super().__enter__()

    def scan(self) -> None:
        """Count every tensor the garbage collector knows: storages made outside the dispatcher (weights read from
        a file by safetensors) join the count."""
        for t in _all_tensors():
            self._track(t)
        self.peak = max(self.peak, self.current)

    @property
    def current(self) -> int:
        """Bytes of the tracked storages alive now."""
        self._sweep()
        return self._total

    def _sweep(self) -> None:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self._total -= self._live.pop(key)[1]

    def _track(self, t: torch.Tensor) -> None:
        if self.device is not None and t.device.type != self.device:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, some subclasses)
            return
        key = storage._cdata
        known = self._live.get(key)
        if known is not None and not known[0].expired():
            if storage.nbytes() > known[1]:  # resized in place
                self._total += storage.nbytes() - known[1]
                self._live[key] = (known[0], storage.nbytes())
        else:
            if known is not None:
                self._total -= known[1]
            self._live[key] = (StorageWeakRef(storage), storage.nbytes())
            self._total += storage.nbytes()
        if self._total > self.peak:  # the upper bound passed the peak: count exactly (live bytes only fall at frees)
            self._sweep()
            self.peak = max(self.peak, self._total)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _all_tensors() -> list[torch.Tensor]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on deprecated module attributes (torch.distributed.reduce_op) warns
        warnings.simplefilter("ignore")
        return [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]


def training_tensors(trainer) -> Iterable[torch.Tensor]:
    """What a Trainer holds between steps: the objective's and the teacher pipeline's weights and buffers, the
    optimizers' states and the EMA (the process's other tensors, e.g. cached prompt embeddings, left out)."""
    pipe = trainer.objective.teacher.pipe
    modules = [trainer.objective, *(m for m in getattr(pipe, "components", {}).values()
                                    if isinstance(m, torch.nn.Module))]
    for m in modules:
        yield from m.parameters()
        yield from m.buffers()
    for opt in trainer.optimizers.values():
        for state in opt.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
    if trainer.ema is not None:
        yield from trainer.ema.model.shadow_params


def measure_training(trainer, steps: int, alive: Iterable[torch.Tensor] | None = None) -> int:
    """Peak live tensor bytes over `steps` seeded training steps of `trainer` (Trainer.train_steps), counting
    from `alive` (default: training_tensors(trainer))."""
    with LiveTensorMemory(alive=training_tensors(trainer) if alive is None else alive) as m:
        trainer.train_steps(steps)
    return m.peak
