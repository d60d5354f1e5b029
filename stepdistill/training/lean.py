"""A lean optimization loop for the analytic-teacher benches and acceptance tests: the objective's own phases,
losses and optimizer groups, without the trainer's I/O (checkpoints, logs, previews, accelerate). Thousands of
steps of a tiny MLP then take seconds on one thread."""
from __future__ import annotations

from collections.abc import Callable

import torch

from stepdistill.config import load_config
from stepdistill.data import PairDataset
from stepdistill.objectives import Objective, build_objective
from stepdistill.objectives.base import get_module


def build(config: str, overrides: list[str], seed: int = 0) -> Objective:
    torch.manual_seed(seed)
    return build_objective(load_config(config, overrides), "cpu")


def optimize(objective: Objective, steps: int, batch_size: int, seed: int = 0, lr_scheduler: str = "constant",
             after_step: Callable[[int], None] | None = None) -> Objective:
    """Run `steps` training steps: each phase the objective schedules does loss, backward, clip, step; then
    `after_step(number of steps done)`, e.g. an evaluation every N steps."""
    from diffusers.optimization import get_scheduler

    groups = {g.name: g for g in objective.optimizer_groups()}
    params = {n: [p for p in get_module(objective, g.module).parameters() if p.requires_grad]
              for n, g in groups.items()}
    optimizers = {n: torch.optim.AdamW(params[n], lr=g.lr, betas=g.betas, eps=g.eps, weight_decay=g.weight_decay,
                                       foreach=True) for n, g in groups.items()}
    schedulers = {n: get_scheduler(lr_scheduler, opt, num_warmup_steps=0, num_training_steps=steps) for n, opt in optimizers.items()}
    data = objective.dataset()
    cached = data.tensors if isinstance(data, PairDataset) else None  # cached teacher pairs / trajectories
    torch.manual_seed(seed + 1)
    for step in range(steps):
        if cached is None:  # the source's training conditions (one part of a partition, or all)
            conditions = torch.as_tensor(objective.source.train_indices)
            batch = {"cond_index": conditions[torch.randint(0, len(conditions), (batch_size,))]}
        else:
            index = torch.randint(0, len(data), (batch_size,))
            batch = {k: v[index] for k, v in cached.items()}
        for phase in objective.phases(step):
            objective.loss(phase, batch, step)["loss"].backward()
            if groups[phase].max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params[phase], groups[phase].max_grad_norm)
            optimizers[phase].step()
            schedulers[phase].step()
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            objective.after_step(phase, step)
        if after_step is not None:
            after_step(step + 1)
    return objective
