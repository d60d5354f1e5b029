"""What a run shows while it trains: progress lines (one per optimizer phase when an objective has several, each
with its own losses) and the tracker (tensorboard by default): every phase's logged terms averaged over the logging
interval, the learning rates, steps/s, skipped steps, metrics and sample grids."""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm


class RunReport:
    def __init__(self, accelerator, phases_at, max_steps: int, start_step: int, progress: bool,
                 tracking: bool) -> None:
        """`phases_at(step)` lists the optimizer phases of a step (Objective.phases)."""
        self.accelerator, self.phases_at, self.tracking = accelerator, phases_at, tracking
        totals, done = Counter(), Counter()  # updates of each phase over the run, and before start_step
        for s in range(max_steps):
            for phase in phases_at(s):
                totals[phase] += 1
                done[phase] += s < start_step
        show = progress and accelerator.is_local_main_process
        if len(totals) <= 1:
            self.bars = {None: tqdm(total=max_steps, initial=start_step, desc="train", unit="step",
                                    disable=not show)}
        else:  # one line per phase: a critic updated 10x as often as the generator shows its own count and loss
            self.bars = {name: tqdm(total=totals[name], initial=done[name], desc=name, unit="update", position=i,
                                    disable=not show) for i, name in enumerate(totals)}
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def step(self, step: int, logs: dict[str, float]) -> None:
        """After training step `step` (0-based) with its logs."""
        for key, value in logs.items():
            if key.startswith("lr/"):  # a schedule's current value, not a quantity to average
                self.sums[key], self.counts[key] = value, 1
            else:
                self.sums[key] += value
                self.counts[key] += 1
        if None in self.bars:
            self.bars[None].update(1)
        else:
            for phase in self.phases_at(step):
                self.bars[phase].update(1)

    def flush(self, step: int, extra: dict[str, float]) -> dict[str, float]:
        """The interval's means (and `extra`) to the progress lines and the tracker; returns them."""
        means = {k: self.sums[k] / self.counts[k] for k in self.sums}
        means.update(extra)
        for phase, bar in self.bars.items():
            if phase is None:  # one phase: its loss terms and the speed
                shown = {k.split("/", 1)[1]: v for k, v in means.items() if "/" in k and not k.startswith("lr/")}
                shown["steps/s"] = means.get("steps_per_s", 0.0)
            else:
                shown = {k[len(phase) + 1:]: v for k, v in means.items() if k.startswith(phase + "/")}
            bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        if self.tracking:
            self.accelerator.log(means, step=step)
        self.sums.clear()
        self.counts.clear()
        return means

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.tracking:
            self.accelerator.log({f"metrics/{k}": v for k, v in metrics.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        """A saved picture (sample grid, scatter) to the trackers that show images."""
        if not self.tracking:
            return
        image = np.asarray(Image.open(path).convert("RGB"))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({name: [Image.fromarray(image)]}, step=step)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def flat_scalars(tree: dict, prefix: str = "") -> dict:
    """A nested config as the flat scalar mapping trackers take as hyperparameters."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_scalars(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
