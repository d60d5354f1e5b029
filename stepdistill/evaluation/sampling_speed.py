"""Sampling speed of a diffusers pipeline: latency (one prompt) and throughput (a batch), at its steps and CFG."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Speed:
    steps: int
    guidance_scale: float
    batch_size: int
    latency_s: float  # median seconds for one image
    images_per_s: float  # batch throughput
    device: str
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(pipe, prompt: str, steps: int, guidance_scale: float, batch_size: int = 16, repeats: int = 3,
                  **kwargs) -> Speed:
    """Median wall time of `repeats` calls (after one warm-up) at batch 1 and at `batch_size`."""
    device = pipe.device

    def run(n: int) -> float:
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt", **kwargs)
            _sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    pipe([prompt], num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt", **kwargs)  # warm-up
    latency = run(1)
    batch_time = run(batch_size)
    return Speed(steps, guidance_scale, batch_size, latency, batch_size / batch_time, str(device),
                 torch.get_num_threads())
