"""Timing on CPU and GPU: device syncs, per-module forward timers, median step times, device facts, and a
context that releases accelerator memory between benchmark items."""
from __future__ import annotations

import gc
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardTimer:
    """Forward time spent inside modules, by name, from pre/post hooks: CUDA events on GPU (no host sync in
    the step), wall clock on CPU. Nested calls (a shared base) count in each module. The hooks run eagerly in
    compiled modules (a graph break at each module's start and end)."""

    def __init__(self, modules: dict[str, nn.Module], device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, list] = {name: [] for name in modules}
        self.handles = []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._mark(name)))
            self.handles.append(module.register_forward_hook(self._mark(name)))

    def _mark(self, name: str) -> Callable:
        @torch.compiler.disable
        def hook(*_):
            if self.cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                self.marks[name].append(event)
            else:
                self.marks[name].append(time.perf_counter())
        return hook

    def reset(self) -> None:
        for v in self.marks.values():
            v.clear()

    def seconds(self) -> dict[str, float]:
        """Seconds per module since the last reset (call after a device sync)."""
        out = {}
        for name, marks in self.marks.items():
            pairs = zip(marks[0::2], marks[1::2])
            out[name] = sum(a.elapsed_time(b) / 1e3 if self.cuda else b - a for a, b in pairs)
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


STEADY = 0.25  # warm-up ends when an iteration is within 25% of the one before it
MAX_EXTRA_WARMUP = 8


def _timed(fn: Callable[[], object], device: torch.device, clock: Callable[[], float]) -> float:
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def median_time(fn: Callable[[], object], device: torch.device, warmup: int, iters: int,
                clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of `iters` calls after warm-up. Warm-up (kernel selection, lazily built state, the first
    touch of memory) is excluded from the timing: at least `warmup` calls, then more (up to MAX_EXTRA_WARMUP) until
    one call takes within STEADY of the call before it, since a first call's cost can outlast a fixed warm-up.
    `warmup=0` times from the first call (an item too slow to repeat)."""
    previous = None
    for n in range(warmup + MAX_EXTRA_WARMUP if warmup else 0):
        seconds = _timed(fn, device, clock)
        if n + 1 >= warmup and previous is not None and abs(seconds - previous) <= STEADY * previous:
            break
        previous = seconds
    return statistics.median(_timed(fn, device, clock) for _ in range(iters))


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"name": "cpu", "threads": torch.get_num_threads(), "peak_bf16_flops": None}
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    seconds = median_time(lambda: a @ b, device, 3, 10)
    return {"name": name, "memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
            "peak_bf16_flops": peak, "measured_bf16_matmul_tflops": round(2 * 8192**3 / seconds / 1e12, 1)}


@contextmanager
def released(device: torch.device) -> Iterator[None]:
    """Frees what the block built (models, optimizers) and resets the peak-memory counter."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- training
