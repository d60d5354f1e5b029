"""DMD2: distribution matching distillation with a fake-score critic, a GAN head, two time-scale updates and
backward simulation (Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis",
NeurIPS 2024, arXiv 2405.14867), computed as the official code (tianweiy/DMD2) computes it.

Defaults follow the paper's SD1.5 recipe (Table/§5 and `experiments/sdv1.5/*.sh`): lr 1e-5, AdamW (0.9, 0.999)
weight decay 0.01, grad-norm clip 10, 10 critic updates per generator update, real guidance 1.75, DM timesteps
in [0.02, 0.98] of T, GAN weights 1e-3 (generator) / 1e-2 (critic).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepdistill.data import PairDataset, generate_pairs
from stepdistill.objectives.base import Objective, ObjectiveConfig, OptimizerGroup, reconstruction_loss
from stepdistill.students import BaseNetwork, adapters_to_fp32, add_lora, lora_targets
from stepdistill.teachers.base import Cond, Teacher


@dataclass
class DMD2Config(ObjectiveConfig):
    name: str = "dmd2"
    generator_lr: float = 1e-5
    critic_lr: float = 1e-5
    weight_decay: float = 0.01
    max_grad_norm: float = 10.0
    critic_updates: int = 10  # fake-score updates per generator update (TTUR; 10 SD1.5, 5 SDXL/ImageNet)
    real_guidance: float = 1.75  # teacher CFG scale of the real score, standard form (SD1.5 1.75, SDXL 8)
    min_step: float = 0.02  # DM-loss timesteps uniform in [min_step, max_step] * T (DMD §3.2)
    max_step: float = 0.98
    dm_weight: float = 1.0
    real_data: str = ""  # GAN real samples: "" (GAN off) | "mixture" (GMM teacher) | latents .safetensors | image folder
    gan_generator_weight: float = 1e-3  # DMD2 §4.3 (1e-3 SD1.5, 5e-3 SDXL, 3e-3 ImageNet)
    gan_critic_weight: float = 1e-2
    gan_max_step: float = 1.0  # real and fake are noised with t ~ U[0, gan_max_step * T) (diffusion GAN)
    backward_simulation: bool = True  # DMD2 §4.4, multi-step students only
    critic_lora_rank: int = 0  # 0: the fake score is a full trainable copy; > 0: a LoRA on a frozen copy
    critic_shared_base: bool = False  # the critic's LoRA in the teacher's own backbone: no frozen copy (needs rank > 0)
    regression_weight: float = 0.0  # optional DMD v1 L_reg on cached teacher pairs (0: off)
    num_pairs: int = 10000
    teacher_steps: int = 50
    pair_dir: str = ""


# ---------------------------------------------------------------------------------------------- GAN head
def bottleneck_module(net: nn.Module) -> nn.Module:
    """The layer whose output feeds the GAN head: a UNet's mid-block (DMD2 §4.3), a transformer's middle
    block, the last hidden block of the MLP backbone."""
    net = getattr(net, "module", net)  # DDP
    if hasattr(net, "mid_block") and net.mid_block is not None:
        return net.mid_block
    if hasattr(net, "transformer_blocks"):
        return net.transformer_blocks[len(net.transformer_blocks) // 2]
    if hasattr(net, "blocks"):
        return net.blocks[-1]
    raise ValueError(f"no bottleneck layer known for {type(net).__name__} (expected mid_block, "
                     "transformer_blocks or blocks)")


def classifier_head(feature_shape: tuple[int, ...]) -> nn.Module:
    """DMD2's discriminator head on bottleneck features of shape [C, H, W], [L, D] or [D]: 4x4 convs with
    stride 2 + GroupNorm + SiLU down to 4x4, one conv to 1x1, then a 1x1 conv to a logit."""
    if len(feature_shape) == 3:
        c, h, _ = feature_shape
        groups = math.gcd(32, c)
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


class Critic(nn.Module):
    """The fake score mu_fake (initialized from the teacher) and the GAN head on its bottleneck. One module,
    so one optimizer trains both and the head's gradient reaches the fake-score backbone (DMD2 §4.3)."""

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
            self._features.append(output[0] if isinstance(output, tuple) else output)

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

    @torch.no_grad()
    def _build_head(self) -> nn.Module:
        teacher = self._teacher[0]
        device = next(self.fake_score.parameters()).device
        x = torch.zeros((1, *teacher.sample_shape), device=device)
        fields = teacher.encode(teacher_probe_condition(teacher)).to(device).fields
        _, features = self._run(x, torch.full((1,), 500.0, device=device), fields)
        return classifier_head(tuple(features.shape[1:])).to(device)

    def forward(self, x_t: Tensor, t: Tensor, fields: dict[str, Tensor], classify: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        """(raw fake-score output, GAN logit or None)."""
        out, features = self._run(x_t, t, fields)
        if not classify:
            return out, None
        if self.head is None:
            raise RuntimeError("the GAN head is disabled: set objective.real_data to enable the GAN term")
        return out, self.head(features.float()).reshape(-1)


def teacher_probe_condition(teacher: Teacher) -> list:
    return [""] if getattr(teacher, "needs_prompts", False) else [0]


def build_fake_score(teacher: Teacher, config: DMD2Config) -> nn.Module:
    """The fake score mu_fake, initialized as the teacher: a trainable copy, a LoRA on a frozen copy, or
    (critic_shared_base) a LoRA injected into the teacher's own backbone. In the shared case the teacher then
    denoises through `BaseNetwork`, the same module with its adapters switched off for each call, so every teacher
    evaluation (real score, regression pairs, samples) sees the base weights, while the critic calls it with the
    adapters on; one set of frozen weights instead of two."""
    rank = config.critic_lora_rank
    if not config.critic_shared_base:
        net = teacher.build_backbone()
        return add_lora(net, rank, float(rank), lora_targets(net)) if rank > 0 else net
    base = getattr(teacher, "backbone", None)
    if not isinstance(base, nn.Module) or not hasattr(teacher, "share_backbone"):
        raise ValueError(f"objective.critic_shared_base=true needs a teacher whose denoiser is a network "
                         f"(teacher.backbone); {type(teacher).__name__} has none: set objective.critic_shared_base=false")
    net = adapters_to_fp32(add_lora(base, rank, float(rank), lora_targets(base)))
    teacher.share_backbone(BaseNetwork(net))
    return net


# ---------------------------------------------------------------------------------------------- real data
class RealSamples:
    """Real data for the GAN term: true-mixture samples (analytic teacher) or cached latents."""

    def __init__(self, spec: str, teacher: Teacher) -> None:
        self.teacher = teacher
        if spec == "mixture":
            if not hasattr(teacher, "mixture"):
                raise ValueError("objective.real_data=mixture needs the analytic teacher (teacher.kind=gmm)")
            self.latents = None
        else:
            from stepdistill.data import load_real_latents

            self.latents = load_real_latents(spec, teacher)

    def draw(self, cond: Cond, device: torch.device) -> Tensor:
        """Real samples for a batch: of the batch's classes for the mixture; random cached latents otherwise
        (their captions are not used: the critic sees them with the batch's conditioning)."""
        n = len(cond)
        if self.latents is None:
            return self.teacher.mixture.sample(n, cond.fields.get("class_labels", None)).to(device)
        idx = torch.randint(0, len(self.latents), (n,))
        return self.latents[idx].to(device)


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


# ---------------------------------------------------------------------------------------------- objective
class DMD2(Objective):
    name = "dmd2"
    config_class = DMD2Config
    config: DMD2Config

    def __init__(self, teacher, generator, source, config: DMD2Config) -> None:
        super().__init__(teacher, generator, source, config)
        if config.critic_updates < 1:
            raise ValueError(f"objective.critic_updates must be >= 1, got {config.critic_updates}")
        if config.critic_shared_base and config.critic_lora_rank <= 0:
            raise ValueError("objective.critic_shared_base=true trains the critic as a LoRA on the teacher's own "
                             f"backbone and needs objective.critic_lora_rank > 0 (got {config.critic_lora_rank}): "
                             "set e.g. objective.critic_lora_rank=64, or objective.critic_shared_base=false")
        self.real = RealSamples(config.real_data, teacher) if config.real_data else None
        self.critic = Critic(teacher, build_fake_score(teacher, config), with_head=self.real is not None)
        self._pair_dir: Path | None = None
        self._pairs: PairDataset | None = None

    def optimizer_groups(self) -> list[OptimizerGroup]:
        c = self.config
        return [
            OptimizerGroup("generator", "generator.backbone", c.generator_lr, weight_decay=c.weight_decay,
                           max_grad_norm=c.max_grad_norm),
            OptimizerGroup("critic", "critic", c.critic_lr, weight_decay=c.weight_decay,
                           max_grad_norm=c.max_grad_norm),
        ]

    def phases(self, step: int) -> list[str]:
        """Two time-scale update rule (DMD2 §4.1): the generator every `critic_updates` steps, the critic every
        step, after the generator, as in the official `train_one_step`."""
        return ["generator", "critic"] if step % self.config.critic_updates == 0 else ["critic"]

    # ------------------------------------------------------------------ data
    def prepare_data(self, output_dir: str, device) -> None:
        c = self.config
        if c.regression_weight <= 0:
            return
        self._pair_dir = generate_pairs(self.teacher, self.source, c.pair_dir or Path(output_dir) / "pairs",
                                        c.num_pairs, c.teacher_steps, c.real_guidance, 0, device=device)

    # ------------------------------------------------------------------ generator input
    def sampled_step(self, step: int) -> int:
        """Which student step is trained: uniform over the student's steps, drawn from a generator seeded by the
        training step, so every process picks the same one (the official code broadcasts it from rank 0) and a
        resumed run repeats it."""
        n = self.generator.num_steps
        return 0 if n == 1 else int(torch.randint(0, n, (1,), generator=torch.Generator().manual_seed(step)))

    def generator_input(self, noise: Tensor, cond: Cond, k: int) -> Tensor:
        """Input of student step k: pure noise for k = 0; for k > 0, with backward simulation, the student's own
        k-step rollout without gradient, as at inference (DMD2 §4.4); without it, real data noised to t_k (the
        train/inference mismatch the paper removes, kept for ablations)."""
        if k == 0:
            return noise
        if self.config.backward_simulation:
            return self.generator.simulate(noise, cond, k)
        if self.real is None:
            raise ValueError("objective.backward_simulation=false with a multi-step student needs objective.real_data")
        t = self.generator.timestep(k, noise.shape[0], noise.device)
        return self.teacher.schedule.add_noise(self.real.draw(cond, noise.device), noise, t)

    # ------------------------------------------------------------------ losses
    def distribution_matching_loss(self, x: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """DMD Eq. 7 with DMD2's normalization, as the official code computes it:
        grad = (p_real - p_fake) / mean_{CHW}|p_real|, p = x - x0_hat, and loss = 0.5 ||x - sg(x - grad)||^2,
        whose gradient w.r.t. x is grad (moving x toward the real score's x0 and away from the fake one's)."""
        c, schedule = self.config, self.teacher.schedule
        with torch.no_grad():
            t = schedule.sample_timesteps(x.shape[0], c.min_step, c.max_step, device=x.device)
            x_t = schedule.add_noise(x.detach(), torch.randn_like(x), t)
            x0_real = self.real_x0(x_t, t, cond)
            out_fake, _ = self.critic(x_t, t, cond.fields)
            x0_fake, _ = schedule.to_x0_eps(out_fake, x_t, t, dtype=torch.float64)
            xd = x.detach().double()
            p_real, p_fake = xd - x0_real, xd - x0_fake
            norm = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
            grad = torch.nan_to_num((p_real - p_fake) / norm).float()
        loss = 0.5 * F.mse_loss(x.float(), (x.float() - grad).detach())
        return loss, grad

    def real_x0(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """x0 of the frozen teacher with classifier-free guidance, in float64."""
        return self.teacher.predict(x_t, t, cond, self.config.real_guidance, dtype=torch.float64).x0

    def gan_timesteps(self, n: int, device: torch.device) -> Tensor:
        T = self.teacher.schedule.num_train_timesteps
        if self.teacher.schedule.kind == "vp":
            return torch.randint(0, max(int(self.config.gan_max_step * T), 1), (n,), device=device)
        return self.teacher.schedule.sample_timesteps(n, 0.0, self.config.gan_max_step, device=device)

    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        cond = self.source.encode(batch["cond_index"]).to(self.device)
        noise = self.noise(len(cond))
        k = self.sampled_step(step)
        x_in = self.generator_input(noise, cond, k)
        if phase == "generator":
            return self.generator_loss(x_in, cond, k, batch)
        with torch.no_grad():
            x = self.generator(x_in, cond, k)
        return self.critic_loss(x, cond)

    def generator_loss(self, x_in: Tensor, cond: Cond, k: int, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        c = self.config
        x = self.generator(x_in, cond, k)
        loss_dm, grad = self.distribution_matching_loss(x, cond)
        losses = {"dm": loss_dm, "dm_grad_norm": grad.flatten(1).norm(dim=1).mean()}
        total = c.dm_weight * loss_dm
        if self.real is not None and c.gan_generator_weight > 0:
            with frozen(self.critic):  # the gradient flows through the critic into G only
                t = self.gan_timesteps(x.shape[0], x.device)
                x_t = self.teacher.schedule.add_noise(x, torch.randn_like(x), t)
                _, logit = self.critic(x_t, t, cond.fields, classify=True)
            loss_g = F.softplus(-logit).mean()  # non-saturating GAN loss (DMD2 §4.3)
            losses["gan_g"] = loss_g
            total = total + c.gan_generator_weight * loss_g
        if c.regression_weight > 0:
            total = total + c.regression_weight * self.regression_loss(x.shape[0], losses)
        losses["loss"] = total
        return losses

    def regression_loss(self, n: int, losses: dict[str, Tensor]) -> Tensor:
        """DMD v1's L_reg: the one-step student from cached noise regresses onto the teacher's ODE endpoint."""
        if self._pairs is None:
            self._pairs = PairDataset(self._pair_dir)
        idx = torch.randint(0, len(self._pairs), (n,))
        pair = {k: v[idx] for k, v in self._pairs.tensors.items()}
        cond = self.source.encode(pair["cond_index"]).to(self.device)
        x0 = self.generator(pair["noise"].to(self.device), cond, 0)
        loss = reconstruction_loss(x0, pair["x0"].to(self.device), "l2", 0.0)
        losses["regression"] = loss
        return loss

    def critic_loss(self, x: Tensor, cond: Cond) -> dict[str, Tensor]:
        """Fake-score denoising loss on detached generator samples over the full timestep range (DMD Eq. 6;
        the official code's unweighted MSE in the model's own parameterization), plus the GAN critic term."""
        c, schedule = self.config, self.teacher.schedule
        x = x.detach()
        t = schedule.sample_timesteps(x.shape[0], 0.0, 1.0, device=x.device)
        eps = torch.randn_like(x)
        x_t = schedule.add_noise(x, eps, t)
        out, _ = self.critic(x_t, t, cond.fields)
        target = schedule.from_x0_eps(x.float(), eps.float(), t)
        loss_denoise = F.mse_loss(out.float(), target.float())
        losses = {"denoise": loss_denoise}
        total = loss_denoise
        if self.real is not None and c.gan_critic_weight > 0:
            real = self.real.draw(cond, x.device)
            t_gan = self.gan_timesteps(x.shape[0], x.device)
            both = torch.cat([schedule.add_noise(x, torch.randn_like(x), t_gan),
                              schedule.add_noise(real, torch.randn_like(real), t_gan)])
            fields = {k: torch.cat([v, v]) for k, v in cond.fields.items()}
            _, logits = self.critic(both, torch.cat([t_gan, t_gan]), fields, classify=True)
            logit_fake, logit_real = logits.chunk(2)
            loss_d = F.softplus(logit_fake).mean() + F.softplus(-logit_real).mean()
            losses["gan_d"] = loss_d
            total = total + c.gan_critic_weight * loss_d
        losses["loss"] = total
        return losses
