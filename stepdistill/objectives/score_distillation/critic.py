"""The critic of score distillation: the fake score mu_fake (a trainable copy of the teacher, a LoRA on a frozen
copy, or a LoRA inside the teacher's own backbone) and DMD2's GAN head on its bottleneck (DMD2 §4.3)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from stepdistill.students.lora import BaseNetwork, adapters_to_fp32, add_lora, lora_targets
from stepdistill.teachers.base import Teacher

CRITIC_KINDS = ("full", "lora", "shared_base")


def bottleneck_module(net: nn.Module) -> nn.Module:
    """The layer whose output feeds the GAN head: a UNet's mid-block (DMD2 §4.3), a transformer's middle
    block, the last hidden block of the MLP backbone."""
    if getattr(net, "mid_block", None) is not None:
        return net.mid_block
    if hasattr(net, "transformer_blocks"):
        return net.transformer_blocks[len(net.transformer_blocks) // 2]
    if hasattr(net, "blocks"):
        return net.blocks[-1]
    raise ValueError(f"no bottleneck layer known for {type(net).__name__} (expected mid_block, "
                     "transformer_blocks or blocks)")


def block_hidden_states(output) -> Tensor:
    """The hidden states a block passes on: joint-attention blocks (SD3, Flux) return (text tokens, image tokens),
    UNet down blocks (hidden states, skip connections); the heads read the image's."""
    if isinstance(output, tuple):
        return [o for o in output if isinstance(o, Tensor)][-1]
    return output


def classifier_head(feature_shape: tuple[int, ...]) -> nn.Module:
    """DMD2's discriminator head on bottleneck features of shape [C, H, W], [L, D] or [D]: 4x4 convs with
    stride 2 + GroupNorm + SiLU down to 4x4, one conv to 1x1, then a 1x1 conv to a logit. GroupNorm keeps the
    official 32 groups where each holds at least 8 channels (SD's 1280: 40 each) and fewer groups on small
    bottlenecks: on the 1x1 map a group of 2 channels normalizes to +-1, which left the discriminator blind."""
    if len(feature_shape) == 3:
        c, h, _ = feature_shape
        groups = 32
        while groups > 1 and (c % groups or c // groups < 8):
            groups //= 2
        layers: list[nn.Module] = []
        while h > 4:
            layers += [nn.Conv2d(c, c, 4, stride=2, padding=1), nn.GroupNorm(groups, c), nn.SiLU()]
            h //= 2
        layers += [nn.Conv2d(c, c, h, stride=h), nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, 1, 1),
                   nn.Flatten()]
        return nn.Sequential(*layers)
    dim = feature_shape[-1]
    pool: list[nn.Module] = [TokenMean()] if len(feature_shape) == 2 else []
    return nn.Sequential(*pool, nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))


class TokenMean(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def probe_fields(teacher: Teacher, device: torch.device) -> dict[str, Tensor]:
    """Conditioning of one probe sample: the teacher's encoding of its probe condition, or fields of the same
    shapes on the meta device (the memory planner's trace, where no text encoder runs) and for an image-conditioned
    teacher (whose conditions come with images from the data)."""
    if device.type == "meta" or teacher.image_conditioned:
        return teacher.fields_like(1, device)
    return teacher.encode(teacher.probe_condition()).to(device).fields


class Critic(nn.Module):
    """The fake score and (optionally) the GAN head on its bottleneck. One module, so one optimizer trains both and
    the head's gradient reaches the fake-score backbone (DMD2 §4.3). `teacher` calls the fake score (a backbone of
    its architecture)."""

    def __init__(self, teacher: Teacher, fake_score: nn.Module, with_head: bool) -> None:
        super().__init__()
        self._teacher = [teacher]
        self.fake_score = fake_score
        self._features: list[Tensor] = []
        self._recording = False  # only the critic's own calls: a shared base also runs the teacher's
        bottleneck_module(fake_score).register_forward_hook(self._capture)
        self.head = self._build_head() if with_head else None

    def _capture(self, module: nn.Module, inputs: tuple, output) -> None:
        if self._recording:
            self._features.append(block_hidden_states(output))

    def _run(self, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """(raw fake-score output, bottleneck features)."""
        self._features.clear()
        self._recording = True
        try:
            out = self._teacher[0].call(self.fake_score, x_t, t, fields)
        finally:
            self._recording = False
        features = self._features.pop() if self._features else None
        self._features.clear()
        return out, features

    @property
    def holds_features(self) -> bool:
        """Whether bottleneck features of a call are still held (none should be, between calls)."""
        return bool(self._features)

    @torch.no_grad()
    def _build_head(self) -> nn.Module:
        teacher = self._teacher[0]
        device = next(self.fake_score.parameters()).device
        x = torch.zeros((1, *teacher.sample_shape), device=device)
        _, features = self._run(x, torch.full((1,), 500.0, device=device), probe_fields(teacher, device))
        return classifier_head(tuple(features.shape[1:])).to(device)

    def forward(self, x_t: Tensor, t: Tensor, fields: dict[str, Tensor], classify: bool = False,
                full_precision: bool = False) -> tuple[Tensor, Tensor | None]:
        """(raw fake-score output, GAN logit or None). `full_precision` switches autocast off inside this call,
        including the autocast accelerate wraps a prepared module's forward in."""
        if full_precision:
            with torch.autocast(device_type=x_t.device.type, enabled=False):
                out, features = self._run(x_t.float(), t, fields)
        else:
            out, features = self._run(x_t, t, fields)
        if not classify:
            return out, None
        if self.head is None:
            raise RuntimeError("the GAN head is disabled: set objective.real_data to enable the GAN term")
        return out, self.head(features.float()).reshape(-1)


def shared_base_rungs(cfg) -> list[tuple[str, list[str]]]:
    """The memory planner's shared-base LoRA critic rung, for a critic not yet shared (and a teacher not offloaded)."""
    if cfg.objective.critic == "shared_base" or cfg.teacher.offload:
        return []
    return [("shared-base LoRA critic", ["objective.critic=shared_base",
                                         f"objective.critic_lora_rank={cfg.objective.critic_lora_rank}"])]


def build_fake_score(teacher: Teacher, kind: str, rank: int, alpha: float | None = None,
                     targets: list[str] | None = None) -> nn.Module:
    """The fake score mu_fake, initialized as the teacher: a trainable copy (full), a LoRA on a frozen copy (lora),
    or a LoRA injected into the teacher's own backbone (shared_base). In the shared case the teacher then
    denoises through `BaseNetwork`, the same module with its adapters switched off for each call, so every teacher
    evaluation (real score, regression pairs, samples) sees the base weights while the critic calls it with the
    adapters on: one set of frozen weights instead of two. LoRA scaling `alpha` defaults to the rank, `targets` to
    the backbone's default LoRA targets (SwiftBrush: to_q and to_v, alpha 108)."""
    if kind == "full":
        return teacher.build_backbone()
    if kind == "lora":
        net = teacher.build_backbone()
        return add_lora(net, rank, alpha or float(rank), targets or lora_targets(net))
    if kind != "shared_base":
        raise ValueError(f"critic kind {kind!r} is not one of {CRITIC_KINDS}")
    if teacher.backbone is None:
        raise ValueError(f"a shared-base critic needs a teacher whose denoiser is a network; the "
                         f"{type(teacher).__name__} teacher has none: use a full or lora critic")
    base = teacher.backbone
    net = adapters_to_fp32(add_lora(base, rank, alpha or float(rank), targets or lora_targets(base)))
    teacher.share_backbone(BaseNetwork(net))
    return net


@contextmanager
def frozen(module: nn.Module):
    """Switch off requires_grad of a module's parameters, restoring each parameter's own flag afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
