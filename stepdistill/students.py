"""Students: a generator G(z, cond) -> x0 in one step or k steps with re-noising between them."""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from stepdistill.schedules import PredictionType
from stepdistill.teachers.base import Cond, Teacher

# LoRA targets of the diffusers LCM-LoRA / DMD2 SDXL recipes (attention, feed-forward, resnet convs, time MLP).
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@dataclass
class StudentConfig:
    kind: str = "copy"  # copy | smaller | lora
    timesteps: list[float] = field(default_factory=lambda: [999])  # conditioning timestep of each sampling step
    prediction_type: str | None = None  # None: the teacher's parameterization
    overrides: dict = field(default_factory=dict)  # backbone config overrides for `smaller`
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_targets: list[str] = field(default_factory=lambda: list(UNET_LORA_TARGETS))
    # weights to start from instead of the teacher's: an exported student folder (final/), a diffusers model folder
    # or a .safetensors file of this backbone, e.g. a no-GAN DMD2 export for the GAN stage (DMD2 SD1.5 recipe)
    init: str = ""

    CHOICES = {"kind": ("copy", "smaller", "lora"),
               "prediction_type": (None, "epsilon", "v_prediction", "sample", "flow")}


class Generator(nn.Module):
    """Wraps a backbone of the teacher's architecture; step i sees its input as x_{t_i} (t_0 may be < T: pure
    noise is then read as if it were x_{t_0}, DMD2's SDXL one-step trick with t_0 = 399)."""

    sampler = "renoise"  # between steps: x0 re-noised with fresh noise (LCMScheduler's rule)

    def __init__(self, backbone: nn.Module, teacher: Teacher, timesteps: list[float],
                 prediction_type: PredictionType | None = None, guidance_w: float | None = None) -> None:
        super().__init__()
        if not timesteps or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
            raise ValueError(f"student timesteps must be a non-empty strictly decreasing list, got {timesteps}")
        self.backbone = backbone
        self._teacher = [teacher]  # a plain list keeps the (frozen, non-Module) teacher out of state_dict
        self.timesteps = [float(t) for t in timesteps]
        self.prediction_type = prediction_type or teacher.schedule.prediction_type
        self.guidance_w = guidance_w  # LCM w fed as `timestep_cond` to a UNet with a guidance embedding

    @property
    def teacher(self) -> Teacher:
        return self._teacher[0]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def timestep(self, step: int, batch: int, device: torch.device) -> Tensor:
        return torch.full((batch,), self.timesteps[step], device=device)

    def forward(self, x_t: Tensor, cond: Cond, step: int = 0) -> Tensor:
        """x0 prediction (fp32) of sampling step `step` for input x_t."""
        return self.teacher.schedule.to_x0_eps(self.output(x_t, cond, step), x_t,
                                               self.timestep(step, x_t.shape[0], x_t.device), self.prediction_type)[0]

    def output(self, x_t: Tensor, cond: Cond, step: int) -> Tensor:
        """Raw backbone output of sampling step `step` (with the guidance embedding of `guidance_w`, if set)."""
        fields = dict(cond.fields)
        if self.guidance_w is not None:
            dim = self.backbone.config.time_cond_proj_dim
            w = torch.full((x_t.shape[0],), self.guidance_w, device=x_t.device)
            fields["timestep_cond"] = guidance_embedding(w, dim)
        return self.teacher.call(self.backbone, x_t, self.timestep(step, x_t.shape[0], x_t.device), fields)

    def renoise(self, x0: Tensor, step: int) -> Tensor:
        """The input of sampling step `step` > 0: x0 of the previous step noised with fresh noise to t_step."""
        t = self.timestep(step, x0.shape[0], x0.device)
        return self.teacher.schedule.add_noise(x0, torch.randn_like(x0), t)

    @torch.no_grad()
    def simulate(self, noise: Tensor, cond: Cond, step: int) -> Tensor:
        """Backward simulation (DMD2 §4.4): the input that the sampler feeds to `step`, produced by running the
        student's own earlier steps without gradient."""
        x = noise
        for i in range(step):
            x = self.renoise(self(x, cond, i), i + 1)
        return x

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Cond, num_steps: int | None = None) -> Tensor:
        """k-step sampling: x0 = G(x_{t_i}), re-noised to t_{i+1} with fresh noise (LCMScheduler's rule)."""
        n = num_steps or self.num_steps
        return self(self.simulate(noise, cond, n - 1), cond, n - 1)


class SegmentGenerator(Generator):
    """A multistep consistency student: deterministic DDIM jumps between segment boundaries (MCD sampling)."""

    sampler = "ddim"

    @torch.no_grad()
    def simulate(self, noise: Tensor, cond: Cond, step: int) -> Tensor:
        schedule, x = self.teacher.schedule, noise
        for i in range(step):
            t = self.timestep(i, x.shape[0], x.device)
            x0, eps = schedule.to_x0_eps(self.output(x, cond, i), x, t, self.prediction_type)
            x = schedule.ddim_step(x0, eps, self.timestep(i + 1, x.shape[0], x.device))
        return x


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """LCM's w-conditioning: sinusoids of 1000 w with frequencies exp(-log(1e4) j / (dim/2 - 1)), [sin, cos]
    (VDM's embedding, fed to the UNet as `timestep_cond`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32, device=w.device))
    args = 1000.0 * w.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def build_student(teacher: Teacher, cfg: StudentConfig) -> Generator:
    """A copy of the teacher backbone, a smaller backbone of the same family, or a LoRA on a frozen copy."""
    if cfg.kind == "copy":
        backbone = teacher.build_backbone()
    elif cfg.kind == "smaller":
        backbone = build_smaller_backbone(teacher.build_backbone(), cfg.overrides)
    elif cfg.kind == "lora":
        backbone = add_lora(teacher.build_backbone(), cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    else:
        raise ValueError(f"student.kind {cfg.kind!r} is not one of {StudentConfig.CHOICES['kind']}")
    if cfg.init:
        if cfg.kind == "lora":
            raise ValueError("student.init loads full backbone weights; it does not apply to student.kind=lora "
                             "(set student.kind=copy, or leave student.init empty)")
        load_init_weights(backbone, cfg.init)
    return Generator(backbone, teacher, cfg.timesteps, cfg.prediction_type)


INIT_WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.safetensors",
                     "diffusion_pytorch_model.safetensors", "generator.safetensors")


def load_init_weights(backbone: nn.Module, path: str) -> None:
    """Load student.init into `backbone`; every key must match (a different architecture is refused)."""
    from stepdistill.safeload import load_weights

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"student.init: {p} does not exist (an exported student folder, a diffusers model "
                                "folder or a weights file)")
    if p.is_dir():
        found = [p / name for name in INIT_WEIGHT_FILES if (p / name).is_file()]
        if not found:
            raise FileNotFoundError(f"student.init: {p} holds none of {list(INIT_WEIGHT_FILES)}: point it at an "
                                    "exported student folder (final/), a diffusers model folder or a weights file")
        p = found[0]
    state = load_weights(p)
    expected = backbone.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(f"student.init: {p} does not fit the student's {type(backbone).__name__} "
                         f"({len(missing)} missing keys, {len(unexpected)} unexpected, {len(reshaped)} of another "
                         f"shape, e.g. {(missing + unexpected + reshaped)[:2]}): use weights of the same architecture")
    backbone.load_state_dict(state)


def build_smaller_backbone(template: nn.Module, overrides: dict) -> nn.Module:
    """The template's architecture with config overrides (fewer blocks/channels), freshly initialized."""
    if not overrides:
        raise ValueError("student.kind=smaller needs student.overrides, e.g. {block_out_channels: [32, 64]}")
    if hasattr(template, "config") and hasattr(type(template), "from_config"):  # a diffusers model
        unknown = sorted(set(overrides) - set(template.config))
        if unknown:
            raise ValueError(f"student.overrides has keys {unknown} that {type(template).__name__}'s config lacks")
        return type(template).from_config({**public_config(template), **overrides})
    from stepdistill.mlp import TimeCondMLP

    if isinstance(template, TimeCondMLP):
        allowed = {"hidden", "depth", "time_dim"}
        if set(overrides) - allowed:
            raise ValueError(f"student.overrides for the MLP backbone take {sorted(allowed)}, got {sorted(overrides)}")
        return TimeCondMLP(template.data_dim, template.num_classes, **overrides)
    raise ValueError(f"cannot build a smaller version of {type(template).__name__}")


def public_config(model: nn.Module) -> dict:
    """A diffusers model's config without private keys: `_use_default_values` would make `from_config` ignore
    overrides of keys that were left at their defaults."""
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


def add_lora(backbone: nn.Module, rank: int, alpha: float, targets: list[str]) -> nn.Module:
    """Freeze the backbone and add a peft LoRA adapter (named "default") on the target modules."""
    from peft import LoraConfig, inject_adapter_in_model

    names = {n for n, _ in backbone.named_modules()}
    present = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if not present:
        raise ValueError(f"none of the LoRA targets {targets} exist in {type(backbone).__name__}")
    backbone.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=present)
    if hasattr(backbone, "add_adapter"):  # diffusers models carry peft integration
        backbone.add_adapter(config)
        return backbone
    return inject_adapter_in_model(config, backbone)


def lora_targets(backbone: nn.Module) -> list[str]:
    """Default LoRA targets of a backbone: the diffusers recipe's for UNets and transformers, every Linear layer
    of the analytic benches' MLP (whose layer names the recipe's do not match)."""
    from stepdistill.mlp import TimeCondMLP

    if isinstance(backbone, TimeCondMLP):
        return [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    return list(UNET_LORA_TARGETS)


def adapter_layers(net: nn.Module) -> list[nn.Module]:
    """The peft adapter layers (LoRA-wrapped Linear / Conv modules) of `net`, a DDP wrapper looked through."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in getattr(net, "module", net).modules() if isinstance(m, BaseTunerLayer)]


def adapters_to_fp32(net: nn.Module) -> nn.Module:
    """Adapter weights in fp32 (peft creates them in the base layer's dtype, bf16 on a bf16 teacher)."""
    for layer in adapter_layers(net):
        for name in layer.adapter_layer_names:
            getattr(layer, name).float()
    return net


@contextmanager
def adapters_off(net: nn.Module) -> Iterator[nn.Module]:
    """`net` computing with its base weights only: peft's `enable_adapters(False)` on every adapter layer, then each
    layer's previous state and each parameter's requires_grad flag restored (peft's `enable_adapters(True)` would
    mark every adapter trainable, even inside a `frozen(...)` block)."""
    layers = adapter_layers(net)
    if not layers:
        raise ValueError(f"{type(net).__name__} has no peft adapters to switch off")
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    enabled = [not layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield net
    finally:
        for layer, on in zip(layers, enabled):
            layer.enable_adapters(on)
        for p, flag in flags:
            p.requires_grad_(flag)


class BaseNetwork(nn.Module):
    """The base of a network with peft adapters, as a module of its own: every call runs with the adapters off.
    It holds `net` itself, not a copy, so the base weights exist once."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        if not adapter_layers(net):
            raise ValueError(f"{type(net).__name__} has no peft adapters: BaseNetwork would be the network itself")
        self.net = net

    @property
    def config(self):
        """The diffusers config of the network (teachers read sample_size, in_channels from it)."""
        return self.net.config

    def forward(self, *args, **kwargs):
        with adapters_off(self.net):
            return self.net(*args, **kwargs)


def frozen_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).requires_grad_(False).eval()
