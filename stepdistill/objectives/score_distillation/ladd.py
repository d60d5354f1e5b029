"""LADD: latent adversarial diffusion distillation (Sauer et al., "Fast High-Resolution Image Synthesis with Latent
Adversarial Diffusion Distillation", arXiv 2403.12015; SD3-Turbo).

No distribution-matching term: the student's samples x_hat are re-noised at t_hat, the frozen teacher runs on
them, and small discriminator heads on its intermediate features tell them from the teacher's own samples (the
paper's synthetic data, §3.2; real images with objective.real=images) re-noised the same way. The generator's
adversarial gradient flows through the frozen teacher into x_hat. Hinge loss (§3.1; SANA-Sprint's LADD), t_hat
drawn logit-normal on the noise fraction, biased toward high noise (§3.1, logit-normal(1, 1): the mean and
scale are not stated in the paper's text read here; FastGen's and SANA-Sprint's settings differ), heads on three
blocks of the upper half of the teacher (FastGen's Wan config reads blocks 15, 22, 29 of 30). Learning rates are
FastGen's LADD defaults (generator 2e-6, discriminator 4e-6). The heads are DMD2's discriminator head
(critic.classifier_head) per block, their logits averaged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from stepdistill.config.schema import ConfigError, PairsConfig
from stepdistill.data import PairDataset, generate_pairs
from stepdistill.objectives.base import Objective, ObjectiveConfig, OptimizerGroup
from stepdistill.objectives.score_distillation.base import draw_student_step
from stepdistill.objectives.score_distillation.critic import (
    block_hidden_states,
    classifier_head,
    frozen,
    probe_fields,
)
from stepdistill.objectives.score_distillation.real_data import RealSamples
from stepdistill.teachers.base import Cond, Teacher


def backbone_blocks(net: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in depth order: a UNet's down, mid and up blocks; a transformer's blocks (Flux: the
    double-stream then the single-stream ones); the MLP's hidden blocks."""
    if getattr(net, "down_blocks", None) is not None:
        return [*net.down_blocks, net.mid_block, *net.up_blocks]
    blocks = [*getattr(net, "transformer_blocks", []), *getattr(net, "single_transformer_blocks", [])]
    blocks = blocks or list(getattr(net, "blocks", []))
    if not blocks:
        raise ValueError(f"no blocks known for {type(net).__name__} (expected down/mid/up blocks, transformer_blocks "
                         "or blocks)")
    return blocks


def default_feature_blocks(num_blocks: int) -> list[int]:
    """Three blocks spread over the upper half of the depth, the last included (FastGen's Wan: 15, 22, 29 of 30)."""
    half = num_blocks // 2
    return sorted({half, (half + num_blocks - 1) // 2, num_blocks - 1})


class TeacherFeatureDiscriminator(nn.Module):
    """Discriminator heads on the frozen teacher's features at chosen blocks (LADD §3.1). The teacher is not a
    submodule: only the heads are trained and checkpointed."""

    def __init__(self, teacher: Teacher, blocks: list[int]) -> None:
        super().__init__()
        if teacher.backbone is None:
            raise ConfigError(f"LADD's discriminator reads the teacher network's features; the "
                              f"{type(teacher).__name__} teacher has none: use a diffusers teacher")
        self._teacher = [teacher]
        all_blocks = backbone_blocks(teacher.backbone)
        bad = [b for b in blocks if not -len(all_blocks) <= b < len(all_blocks)]
        if bad:
            raise ConfigError(f"objective.feature_blocks {bad}: the teacher has {len(all_blocks)} blocks; use indices "
                              f"below {len(all_blocks)}, or leave it empty for {default_feature_blocks(len(all_blocks))}")
        self.blocks = [b % len(all_blocks) for b in blocks]
        self._features: dict[int, Tensor] = {}
        self._recording = False
        for i in self.blocks:
            all_blocks[i].register_forward_hook(self._capture(i))
        self.heads = self._build_heads()

    def _capture(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            if self._recording:
                self._features[index] = block_hidden_states(output)
        return hook

    def features(self, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> list[Tensor]:
        """The teacher's features at the chosen blocks for x_t (its output is not used)."""
        teacher = self._teacher[0]
        self._features.clear()
        self._recording = True
        try:
            teacher.call(teacher.backbone, x_t, t, fields)
        finally:
            self._recording = False
        features = [self._features[i].float() for i in self.blocks]
        self._features.clear()
        return features

    @torch.no_grad()
    def _build_heads(self) -> nn.ModuleList:
        teacher = self._teacher[0]
        device = torch.device(teacher.device)
        x = torch.zeros((1, *teacher.sample_shape), device=device)
        features = self.features(x, torch.full((1,), 500.0, device=device), probe_fields(teacher, device))
        shapes = [tuple(f.shape[1:]) for f in features]
        return nn.ModuleList(classifier_head(s) for s in shapes).to(device)

    def forward(self, x_t: Tensor, t: Tensor, fields: dict[str, Tensor]) -> Tensor:
        """One logit per sample: the heads' logits averaged (real = positive)."""
        logits = [head(f).reshape(-1) for head, f in zip(self.heads, self.features(x_t, t, fields))]
        return torch.stack(logits).mean(0)


@dataclass
class LADDConfig(ObjectiveConfig):
    name: str = "ladd"
    generator_lr: float = 2e-6
    discriminator_lr: float = 4e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    discriminator_updates: int = 1  # discriminator updates per generator update
    loss: str = "hinge"  # hinge (LADD §3.1) | non_saturating (FastGen's softplus)
    feature_blocks: list[int] = field(default_factory=list)  # empty: default_feature_blocks of the teacher
    t_logit_mean: float = 1.0  # t_hat / T ~ logit-normal(mean, std): biased toward high noise
    t_logit_std: float = 1.0
    real: str = "teacher"  # teacher (its ODE samples, the paper's synthetic data) | images (data.image_dir)
    pairs: PairsConfig = field(default_factory=PairsConfig)  # the teacher's samples (real=teacher)

    CHOICES = {"loss": ("hinge", "non_saturating"), "real": ("teacher", "images")}
    RANGES = {"generator_lr": ">0", "discriminator_lr": ">0", "weight_decay": ">=0", "max_grad_norm": ">=0",
              "discriminator_updates": ">=1", "t_logit_std": ">0"}


class LADD(Objective):
    name = "ladd"
    config_class = LADDConfig
    config: LADDConfig

    def __init__(self, teacher, generator, source, config: LADDConfig, data=None) -> None:
        super().__init__(teacher, generator, source, config, data)
        blocks = config.feature_blocks
        if not blocks and teacher.backbone is not None:
            blocks = default_feature_blocks(len(backbone_blocks(teacher.backbone)))
        self.discriminator = TeacherFeatureDiscriminator(teacher, blocks)
        self.real: RealSamples | None = None

    def optimizer_groups(self) -> list[OptimizerGroup]:
        c = self.config
        return [OptimizerGroup("generator", "generator.backbone", c.generator_lr, weight_decay=c.weight_decay,
                               max_grad_norm=c.max_grad_norm),
                OptimizerGroup("discriminator", "discriminator", c.discriminator_lr, weight_decay=c.weight_decay,
                               max_grad_norm=c.max_grad_norm)]

    def phases(self, step: int) -> list[str]:
        k = self.config.discriminator_updates
        return ["generator", "discriminator"] if step % k == 0 else ["discriminator"]

    def prepare_data(self, output_dir, device) -> None:
        self._pair_dir = generate_pairs(self.teacher, self.source, self.config.pairs, output_dir, device)
        if self.config.real == "images":
            self.real = RealSamples.from_config("images", self.teacher, self.data_config, output_dir)

    def dataset(self) -> Dataset:
        return PairDataset(self._pair_dir)

    @property
    def reference_guidance(self) -> float:
        return self.config.pairs.guidance

    def trace_phase(self, phase: str, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if phase == "discriminator":
            return self.discriminator(x, t, cond.fields)
        return super().trace_phase(phase, x, t, cond)

    # ------------------------------------------------------------------ losses
    def noised(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x re-noised at t_hat, t_hat / T ~ logit-normal (LADD §3.1)."""
        c, schedule = self.config, self.teacher.schedule
        u = torch.sigmoid(c.t_logit_mean + c.t_logit_std * torch.randn(x.shape[0], device=x.device))
        lo, hi = schedule.timestep_range()
        t = (u * schedule.num_train_timesteps).clamp(lo, hi)
        if schedule.kind == "vp":
            t = t.round()
        return schedule.add_noise(x, torch.randn_like(x), t), t

    def student_sample(self, cond: Cond, step: int, grad: bool) -> Tensor:
        """A student sample at a uniformly drawn step k (seeded by the training step, as DMD2's), its input the
        student's own k-step rollout without gradient (backward simulation, DMD2 §4.4)."""
        k = draw_student_step(self.generator.num_steps, step)
        x_in = self.noise(len(cond))
        if k > 0:
            x_in = self.generator.simulate(x_in, cond, k)
        with torch.set_grad_enabled(grad):
            return self.generator(x_in, cond, self.generator.time(k, x_in))

    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        cond = self.source.encode(batch["cond_index"]).to(self.device)
        if phase == "generator":
            x = self.student_sample(cond, step, grad=True)
            with frozen(self.discriminator):
                logit = self.discriminator(*self.noised(x), cond.fields)
            loss = -logit.mean() if self.config.loss == "hinge" else F.softplus(-logit).mean()
            return {"loss": loss, "adv_g": loss}
        fake = self.student_sample(cond, step, grad=False)
        if self.real is None:
            real, real_cond = batch["x0"].to(self.device), cond
        else:
            real, real_cond = self.real.draw(cond, self.device)
        logit_fake = self.discriminator(*self.noised(fake), cond.fields)
        logit_real = self.discriminator(*self.noised(real), real_cond.fields)
        if self.config.loss == "hinge":
            loss = F.relu(1 - logit_real).mean() + F.relu(1 + logit_fake).mean()
        else:
            loss = F.softplus(-logit_real).mean() + F.softplus(logit_fake).mean()
        return {"loss": loss, "adv_d": loss, "logit_real": logit_real.mean().detach(),
                "logit_fake": logit_fake.mean().detach()}
