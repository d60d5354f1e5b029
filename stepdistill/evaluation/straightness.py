"""Straightness of ODE paths (Liu et al. 2023, Eq. 5 / Def. 2.3): S(Z) = int_0^1 E || (Z_1 - Z_0) - dZ_u/du ||^2 du,
zero exactly when every path is straight (one Euler step is then exact). Paths are compared in rectified-flow
coordinates (NoiseSchedule.to_flow), so a VP teacher's probability-flow ODE (the 1-rectified flow that InstaFlow
starts from) and a flow student's Euler paths are measured alike."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from stepdistill.teachers.base import Cond, Teacher


def straightness(path: Iterable[tuple[Tensor, float]]) -> float:
    """S of discretized paths given as (states [B, ...], flow time) from noise to data. A path that covers only
    part of the flow time (a VP sampler starts at s < 1) has its time mapped linearly onto [0, 1]."""
    states, times = zip(*[(x.double().flatten(1), float(s)) for x, s in path])
    span = times[0] - times[-1]
    total = states[-1] - states[0]
    s = 0.0
    for i in range(len(states) - 1):
        du = (times[i] - times[i + 1]) / span
        s += du * float((total - (states[i + 1] - states[i]) / du).pow(2).sum(1).mean())
    return s


@torch.no_grad()
def teacher_flow_path(teacher: Teacher, noise: Tensor, cond: Cond, num_steps: int, guidance: float = 1.0
                      ) -> list[tuple[Tensor, float]]:
    """The teacher's deterministic sampler path (`num_steps` steps from pure noise) in rectified-flow coordinates."""
    timesteps = teacher.schedule.inference_timesteps(num_steps)
    path = []
    for t, x in zip([*timesteps, None], teacher.ode_states(noise, cond, timesteps, guidance)):
        if t is None:
            path.append((x, 0.0))
            continue
        z, s = teacher.schedule.to_flow(x, torch.full((x.shape[0],), float(t), device=x.device))
        path.append((z, float(s[0])))
    return path
