"""The MeanFlow student: an average-velocity model u(z, r, t) over a stock backbone (MeanFlow, Geng et al.,
arXiv 2505.13447, §4.1), in the package's flow convention z_s = (1 - s) x + s eps, s = 1 at noise, u = eps - x
at r = t.

Two times: the official DiT embeds t and h = t - r with two timestep embedders and sums them
(Gsunshine/meanflow `models_dit.py`). Here the backbone's own time embedder keeps t, and its output gains e(h), a
second embedder whose last layer starts at zero, so that step 0 reproduces the backbone (FastGen zero-initializes
its h-embedder for distillation, `networks/Wan/network.py::init_embedder`). The embedder sits in the backbone
(`TimeAndInterval`, in the time embedder's place), so checkpoints, EMA, accelerate and FSDP see one module.

Export: on a uniform grid of N steps every step has the same h = T / N, so e(h) is a constant vector that folds
into the bias of the time embedder's last linear layer. The export is then the stock architecture (plain diffusers
loads it) sampled by Euler steps on that grid, z_r = z_t - (t - r) u(z_t, r, t), which is MeanFlow's sampler
(§4.1) and the FlowMatch scheduler's step at sigmas [1, ..., 1/N]."""
from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from stepdistill.config.schema import ConfigError
from stepdistill.mlp import timestep_embedding
from stepdistill.schedules import NoiseSchedule
from stepdistill.students.base import OdeGenerator, SamplingRecipe
from stepdistill.teachers.base import Cond, Teacher

# h = t - r (model time units) of the backbone call in progress; read by the TimeAndInterval inside the backbone
_INTERVAL: ContextVar[Tensor | None] = ContextVar("meanflow_interval", default=None)

# per architecture: the module whose output is the time embedding, and its last linear layer (relative path)
TIME_EMBEDDERS = {"TimeCondMLP": ("time_mlp", "2"), "UNet2DConditionModel": ("time_embedding", "linear_2"),
                  "SD3Transformer2DModel": ("time_text_embed.timestep_embedder", "linear_2")}
FREQUENCY_DIM = 256  # DiT's TimestepEmbedder frequency_embedding_size, as the MeanFlow DiT's h-embedder


def uniform_grid(num_steps: int, num_train_timesteps: int) -> list[float]:
    """[T, T (N-1)/N, ..., T/N]: N steps of equal length h = T / N."""
    return [num_train_timesteps * (1.0 - i / num_steps) for i in range(num_steps)]


class IntervalEmbedding(nn.Module):
    """e(h) = W2 SiLU(W1 sinusoids(h)): DiT's TimestepEmbedder with W2 = 0 at initialization."""

    def __init__(self, width: int, frequency_dim: int = FREQUENCY_DIM) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.linear_1 = nn.Linear(frequency_dim, width)
        self.linear_2 = nn.Linear(width, width)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear_2(nn.functional.silu(self.linear_1(timestep_embedding(h, self.frequency_dim))))


class TimeAndInterval(nn.Module):
    """The backbone's time embedder plus e(h), h taken from the `interval` context of the call."""

    def __init__(self, embedder: nn.Module, width: int) -> None:
        super().__init__()
        self.embedder, self.interval = embedder, IntervalEmbedding(width)

    def forward(self, *args, **kwargs) -> Tensor:
        out = self.embedder(*args, **kwargs)
        h = _INTERVAL.get()
        if h is None:
            raise RuntimeError("a MeanFlow backbone was called without its interval h = t - r: call it through "
                               "MeanFlowGenerator.average_velocity")
        return out + self.interval(h.to(out.device)).to(out.dtype)


@contextmanager
def interval(h: Tensor) -> Iterator[None]:
    token = _INTERVAL.set(h)
    try:
        yield
    finally:
        _INTERVAL.reset(token)


def _embedder_path(backbone: nn.Module) -> tuple[str, str]:
    name = type(backbone).__name__
    if name not in TIME_EMBEDDERS:
        raise ConfigError(f"the MeanFlow student adds an interval embedding to the time embedding of "
                          f"{sorted(TIME_EMBEDDERS)}; a {name} backbone is not supported")
    return TIME_EMBEDDERS[name]


def with_interval_embedding(backbone: nn.Module) -> nn.Module:
    """`backbone` with its time embedder wrapped in a TimeAndInterval (in place; idempotent)."""
    path, last = _embedder_path(backbone)
    embedder = backbone.get_submodule(path)
    if isinstance(embedder, TimeAndInterval):
        return backbone
    linear = embedder.get_submodule(last)
    linear = getattr(linear, "base_layer", linear)  # a LoRA-wrapped layer
    parent, _, child = path.rpartition(".")
    wrapped = TimeAndInterval(embedder, linear.out_features).to(linear.weight.device)
    setattr(backbone.get_submodule(parent) if parent else backbone, child, wrapped)
    return backbone


@torch.no_grad()
def folded_backbone(backbone: nn.Module, h: float) -> nn.Module:
    """A copy of the stock architecture computing what `backbone` computes at interval h: e(h) added to the bias of
    the time embedder's last linear layer, the wrapper removed."""
    net = copy.deepcopy(backbone)
    path, last = _embedder_path(net)
    wrapped = net.get_submodule(path)
    linear = wrapped.embedder.get_submodule(last)
    linear = getattr(linear, "base_layer", linear)
    e = wrapped.interval(torch.tensor([h], device=linear.bias.device, dtype=torch.float32))[0]
    linear.bias.add_(e.to(linear.bias.dtype))
    parent, _, child = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, wrapped.embedder)
    return net


class MeanFlowGenerator(OdeGenerator):
    """u_theta(z, r, t) on a flow schedule, sampled with N equal MeanFlow steps from pure noise (N = `num_steps` by
    default, any N in process: 1-NFE x = eps - u(eps, 0, 1), 2-NFE 1 -> 0.5 -> 0)."""

    def __init__(self, backbone: nn.Module, teacher: Teacher, num_steps: int, schedule: NoiseSchedule) -> None:
        if schedule.kind != "flow":
            raise ConfigError(f"a MeanFlow student needs a flow schedule, got {schedule.kind}: "
                              "set student.schedule=flow")
        super().__init__(with_interval_embedding(backbone), teacher,
                         uniform_grid(num_steps, schedule.num_train_timesteps), schedule, "flow")

    def average_velocity(self, z: Tensor, cond: Cond, r: Tensor, t: Tensor) -> Tensor:
        """u_theta(z, r, t) for flow times r <= t [B] (fp32); differentiable in z, r and t (forward mode too)."""
        with interval(self.schedule.flow_timestep(t - r)):
            return self.teacher.call(self.backbone, z, self.schedule.flow_timestep(t), self.fields(cond, z))

    def output(self, z: Tensor, cond: Cond, t: Tensor) -> Tensor:
        """u(z, 0, t): the average velocity to the data, so that `forward` is the one-jump x0 = z - s u."""
        s = t.to(torch.float32) / self.schedule.num_train_timesteps
        return self.average_velocity(z, cond, torch.zeros_like(s), s)

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Cond, num_steps: int | None = None) -> Tensor:
        """z_r = z_t - (t - r) u(z_t, r, t) over N equal steps from s = 1 to 0 (MeanFlow §4.1)."""
        T = self.schedule.num_train_timesteps
        grid = uniform_grid(num_steps or self.num_steps, T) + [0.0]
        x = noise.to(torch.float32)
        for t, r in itertools.pairwise(grid):
            t_vec, r_vec = torch.full((x.shape[0],), t, device=x.device), torch.full((x.shape[0],), r, device=x.device)
            u = self.average_velocity(x, cond, r_vec / T, t_vec / T)
            x = self.schedule.step(u, x, t_vec, r_vec, "flow")
        return x

    def advance(self, z: Tensor, cond: Cond, step: int) -> Tensor:
        T = self.schedule.num_train_timesteps
        t = self.time(step, z)
        r = self.time(step + 1, z) if step + 1 < self.num_steps else torch.zeros_like(t)
        return self.schedule.step(self.average_velocity(z, cond, r / T, t / T), z, t, r, "flow")

    def folded(self) -> FoldedMeanFlowGenerator:
        """The export's generator: the stock backbone with e(T / N) folded in, on the same N-step grid. A LoRA
        student is merged: the interval embedding and its fold live outside the adapter, so an adapter alone would
        not be this student."""
        from stepdistill.export.diffusers_student import merged_backbone
        from stepdistill.export.mlp import merged_mlp
        from stepdistill.mlp import TimeCondMLP
        from stepdistill.students.lora import adapter_layers

        net = folded_backbone(self.backbone, self.schedule.num_train_timesteps / self.num_steps)
        if adapter_layers(net):
            net = merged_mlp(net) if isinstance(net, TimeCondMLP) else merged_backbone(net)
        return FoldedMeanFlowGenerator(net, self.teacher, self.timesteps, self.schedule, "flow")


class FoldedMeanFlowGenerator(OdeGenerator):
    """An exported MeanFlow student: a stock backbone whose velocity at each grid time is u(z, t - T/N, t), so
    that Euler steps on the N-step grid are MeanFlow steps."""

    def recipe(self) -> SamplingRecipe:
        recipe = super().recipe()
        recipe.extra["num_train_timesteps"] = self.schedule.num_train_timesteps  # T = 1: the backbone reads s
        recipe.extra["note"] = (f"MeanFlow average-velocity student with its interval embedding folded in at "
                                f"h = T/{self.num_steps}: sample with exactly these {self.num_steps} Euler step(s)")
        return recipe

    @classmethod
    def from_recipe(cls, backbone: nn.Module, teacher: Teacher, recipe: dict) -> FoldedMeanFlowGenerator:
        schedule = NoiseSchedule.flow(recipe["flow_shift"], recipe["num_train_timesteps"])
        return cls(backbone, teacher, recipe["timesteps"], schedule, "flow")
