"""Sample guards: statistics of the student's samples during training, beside the same statistics of the teacher's
samples from the same noise and prompts, with a warning when the student oversaturates or collapses.

Every `train.sample_stats_every` steps (and at the start and the end) the student (with its EMA weights, as it
would be exported) samples `NUM_SAMPLES` images spread over up to `MAX_PROMPTS` prompts from fixed noise.
Logged (trackers, and `<output_dir>/sample_stats.jsonl`): latent mean and std; image mean, std and clipped
fraction (channel values the decoder clamps to 0 or 1); diversity, the RMS distance between two samples of one
prompt, averaged over the prompts (of images, or of latents for teachers without a VAE). The teacher's reference
is its own deterministic sampler at the guidance the objective distils (`Objective.reference_guidance`). The
untrained student (step 0) is logged but not judged: a one-step copy of the teacher starts near the conditional
mean, as low in diversity as a collapsed one."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from stepdistill.training.hooks import Hook

if TYPE_CHECKING:
    from stepdistill.training.trainer import Trainer

MAX_PROMPTS, NUM_SAMPLES = 10, 40
TEACHER_STEPS = 25
STATS_FILE = "sample_stats.jsonl"
# Warning thresholds, relative to the teacher's samples; calibrated on the digits runs in docs/DMD2.md.
COLLAPSE_RATIO = 0.5  # diversity below half the teacher's
CLIPPED_EXCESS = 0.10  # clipped fraction above the teacher's by more than this
LATENT_STD_RATIO = 2.0  # latent std above twice the teacher's


def sample_statistics(x0: Tensor, num_prompts: int, teacher) -> dict[str, float]:
    """Statistics of samples x0 [n, ...] where sample i belongs to prompt i % num_prompts."""
    stats = {"latent_mean": float(x0.mean()), "latent_std": float(x0.std())}
    x = x0.float()
    if teacher.makes_images:
        x = teacher.decode(x0).float()
        clipped = (x <= 0.5 / 255) | (x >= 254.5 / 255)
        stats.update(image_mean=float(x.mean()), image_std=float(x.std()), clipped=float(clipped.float().mean()))
    per_prompt = x.reshape(-1, num_prompts, x[0].numel()).transpose(0, 1)  # [prompts, samples, features]
    distances = torch.cdist(per_prompt, per_prompt) / per_prompt.shape[-1] ** 0.5
    k = per_prompt.shape[1]
    stats["diversity"] = float(distances.sum() / (num_prompts * k * (k - 1)))
    return stats


def guard_warnings(stats: dict[str, float], reference: dict[str, float]) -> dict[str, str]:
    """{kind: message} for statistics that leave the teacher's range: collapse, oversaturation."""
    out = {}
    if stats["diversity"] < COLLAPSE_RATIO * reference["diversity"]:
        out["collapse"] = (f"sample diversity {stats['diversity']:.4g} is below {COLLAPSE_RATIO:g}x the teacher's "
                           f"({reference['diversity']:.4g}): the student is collapsing to few samples per prompt")
    if "clipped" in stats and stats["clipped"] > reference["clipped"] + CLIPPED_EXCESS:
        out["oversaturation"] = (f"{stats['clipped']:.1%} of image values are clipped (teacher "
                                 f"{reference['clipped']:.1%}): the student oversaturates")
    elif stats["latent_std"] > LATENT_STD_RATIO * reference["latent_std"]:
        out["oversaturation"] = (f"latent std {stats['latent_std']:.3g} is above {LATENT_STD_RATIO:g}x the "
                                 f"teacher's ({reference['latent_std']:.3g}): the student oversaturates")
    return out


@dataclass
class _Probe:
    noise: Tensor
    cond: object
    num_prompts: int


class SampleGuard(Hook):
    """Logs sample statistics every `train.sample_stats_every` steps (0: off) and warns once per kind."""

    def __init__(self) -> None:
        self.probe: _Probe | None = None
        self.reference: dict[str, float] = {}
        self.warned: set[str] = set()

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.cfg.train.sample_stats_every or not trainer.accelerator.is_main_process:
            return
        objective = trainer.objective
        teacher, source = objective.teacher, objective.source
        num_prompts = min(len(source), MAX_PROMPTS)
        n = num_prompts * max(NUM_SAMPLES // num_prompts, 2)
        device = trainer.accelerator.device
        g = torch.Generator().manual_seed(trainer.cfg.train.seed)
        noise = torch.randn((n, *teacher.sample_shape), generator=g).to(device)
        cond = source.encode(torch.arange(n) % num_prompts).to(device)
        self.probe = _Probe(noise, cond, num_prompts)
        if trainer.step == 0:
            (trainer.output_dir / STATS_FILE).unlink(missing_ok=True)
        with torch.no_grad():
            x0 = teacher.sample(noise, cond, TEACHER_STEPS, objective.reference_guidance)
            self.reference = sample_statistics(x0, num_prompts, teacher)
        self._write(trainer, {"step": "teacher", "guidance": objective.reference_guidance, **self.reference})
        self._measure(trainer)

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        every = trainer.cfg.train.sample_stats_every
        if self.probe is not None and (trainer.step % every == 0 or trainer.step == trainer.cfg.train.max_steps):
            self._measure(trainer)

    @torch.no_grad()
    def _measure(self, trainer: Trainer) -> None:
        p = self.probe
        device = p.noise.device
        with trainer.inference_generator(ema=True) as generator, \
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(trainer.cfg.train.seed)
            x0 = generator.sample(p.noise, p.cond)
        stats = sample_statistics(x0, p.num_prompts, generator.teacher)
        self._write(trainer, {"step": trainer.step, **stats})
        if trainer.cfg.train.report_to != "none":
            trainer.accelerator.log({f"samples/{k}": v for k, v in stats.items()}, step=trainer.step)
        if trainer.step == 0:
            return
        for kind, message in guard_warnings(stats, self.reference).items():
            if kind not in self.warned:
                self.warned.add(kind)
                trainer.warn("step %d: %s (%s)", trainer.step, message, STATS_FILE)

    @staticmethod
    def _write(trainer: Trainer, row: dict) -> None:
        trainer.output_dir.mkdir(parents=True, exist_ok=True)
        with (trainer.output_dir / STATS_FILE).open("a") as f:
            f.write(json.dumps(row) + "\n")
