"""What the score-distillation objectives share (DMD2, VSD/SwiftBrush, SNOOPI, SiD): a generator trained against a
frozen real score (the teacher, guided) and a learned fake score (the critic) on the generator's own samples, with
two time-scale updates, backward simulation for multi-step students and an optional GAN head on real data.
A method supplies its generator loss; the critic's denoising loss and the GAN terms are here."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from stepdistill.config.schema import ConfigError
from stepdistill.guidance import GUIDANCE_DRAWS, GuidanceSampler, apply_guidance
from stepdistill.objectives.base import Objective, ObjectiveConfig, OptimizerGroup, PlanHints
from stepdistill.objectives.score_distillation.critic import (
    CRITIC_KINDS,
    Critic,
    build_fake_score,
    frozen,
    shared_base_rungs,
)
from stepdistill.objectives.score_distillation.real_data import REAL_DATA, RealSamples
from stepdistill.teachers.base import Cond

FAKE_GUIDANCE = ("none", "same")
CRITIC_WEIGHTINGS = ("uniform", "alpha2")
SHARED_CRITIC_RANK = 64  # the planner's shared-base critic rung: the LoRA rank of the MSD and SNOOPI recipes


@dataclass
class ScoreDistillationConfig(ObjectiveConfig):
    generator_lr: float = 1e-5
    critic_lr: float = 1e-5
    weight_decay: float = 0.01
    max_grad_norm: float = 10.0  # 0: no clipping
    critic_updates: int = 10  # critic updates per generator update (TTUR)
    real_guidance: float = 1.75  # CFG scale of the real score, standard form
    min_step: float = 0.02  # generator-loss timesteps uniform in [min_step, max_step] * T
    max_step: float = 0.98
    critic: str = "full"  # full (a trainable copy) | lora (on a frozen copy) | shared_base (LoRA in the teacher)
    critic_lora_rank: int = 64
    real_data: str = ""  # GAN real samples: "" (GAN off) | mixture (GMM teacher) | images (data.image_dir)
    gan_generator_weight: float = 1e-3
    gan_critic_weight: float = 1e-2
    gan_max_step: float = 1.0  # real and fake are noised with t ~ U[0, gan_max_step * T) (diffusion GAN)
    backward_simulation: bool = True  # DMD2 §4.4, multi-step students only
    # SNOOPI's PG-SB: the real score's guidance drawn from U[low, high] instead of real_guidance (empty: fixed),
    # one scale per sample or one per batch (real_guidance_draw)
    real_guidance_range: list[float] = field(default_factory=list)
    real_guidance_draw: str = "sample"
    # the fake score's guidance in the generator loss: none (DMD2: conditional, unguided) | same (the real score's
    # scale, the same draw: SwiftBrush, PG-SB, SiD-LSG)
    fake_guidance: str = "none"
    critic_guidance: float = 1.0  # CFG of the fake score's output in its own denoising loss (SiD-LSG's kappa_1)
    critic_null_prob: float = 0.0  # conditions dropped to the null one in the critic's loss (SwiftBrush: 0.1)
    # generator samples drawn for the null prompt: the student keeps the teacher's unconditional mode (what
    # prompt="" samples, and what a negative prompt steers away from). Not in the papers, whose students see
    # millions of captions; 0 leaves the prompt pool as it is
    generator_null_prob: float = 0.0
    # the critic's sample on a generator step: a fresh one after the generator's update (fresh), or the generator's
    # own, drawn before its update (reuse: the official DMD2 `train_one_step`). Fresh by default: measured on the
    # GMM bench (dmd2_gmm, seed 0), reuse reaches SW2 0.142 / precision 0.59 against fresh's 0.084 / 0.68
    critic_sample: str = "fresh"
    critic_weighting: str = "uniform"  # uniform (DMD2) | alpha2 (SwiftBrush: alpha_t^2 times the squared error)
    critic_lora_alpha: float = 0.0  # LoRA critics: the scaling alpha (0: the rank)
    critic_lora_targets: list[str] = field(default_factory=list)  # LoRA critics: module names (empty: the defaults)

    CHOICES = {"critic": CRITIC_KINDS, "real_data": REAL_DATA, "real_guidance_draw": GUIDANCE_DRAWS,
               "fake_guidance": FAKE_GUIDANCE, "critic_weighting": CRITIC_WEIGHTINGS,
               "critic_sample": ("reuse", "fresh")}
    RANGES = {"generator_lr": ">0", "critic_lr": ">0", "weight_decay": ">=0", "max_grad_norm": ">=0",
              "critic_updates": ">=1", "real_guidance": ">=0", "min_step": "[0,1]", "max_step": "[0,1]",
              "critic_lora_rank": ">=1", "gan_generator_weight": ">=0", "gan_critic_weight": ">=0",
              "gan_max_step": "(0,1]", "critic_guidance": ">=0", "critic_null_prob": "[0,1]",
              "generator_null_prob": "[0,1)",
              "critic_lora_alpha": ">=0"}


def autocast_off(device: torch.device):
    """A region where no autocast applies (mixed precision stays on outside it)."""
    return torch.autocast(device_type=device.type, enabled=False)


class ScoreDistillation(Objective):
    """Generator and critic phases with TTUR; subclasses implement `generator_loss`."""

    config: ScoreDistillationConfig

    def __init__(self, teacher, generator, source, config: ScoreDistillationConfig, data=None) -> None:
        super().__init__(teacher, generator, source, config, data)
        if config.min_step > config.max_step:
            raise ConfigError(f"objective.min_step ({config.min_step}) must not exceed objective.max_step "
                              f"({config.max_step})")
        if config.generator_null_prob > 0 and config.real_data:
            raise ConfigError("objective.generator_null_prob with the GAN term (objective.real_data) is not "
                              "supported: the discriminator would tell the null-prompt samples apart by their "
                              "condition alone; set objective.generator_null_prob=0 or objective.real_data=''")
        self.real: RealSamples | None = None
        if config.real_data == "mixture":
            self.real = RealSamples("mixture", teacher)
        fake_score = build_fake_score(teacher, config.critic, config.critic_lora_rank,
                                      config.critic_lora_alpha or None, config.critic_lora_targets or None)
        self.critic = Critic(teacher, fake_score, with_head=bool(config.real_data))
        self.real_guidance = real_guidance_sampler(config)
        self._sample: tuple[int, Tensor, Cond] | None = None  # (step, detached generator sample, its conditions)

    @classmethod
    def shares_teacher_backbone(cls, config: ScoreDistillationConfig) -> bool:
        return config.critic == "shared_base"

    @classmethod
    def plan_hints(cls, cfg) -> PlanHints:
        return PlanHints(meta_overrides=["objective.real_data=''"], rungs=shared_base_rungs(cfg))

    @property
    def reference_guidance(self) -> float:
        return self.config.real_guidance

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

    def prepare_data(self, output_dir, device) -> None:
        if self.config.real_data == "images":
            self.real = RealSamples.from_config("images", self.teacher, self.data_config, output_dir)

    def trace_phase(self, phase: str, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if phase == "critic":
            return self.critic(x, t, cond.fields)[0]
        return super().trace_phase(phase, x, t, cond)

    # ------------------------------------------------------------------ generator input
    def sampled_step(self, step: int) -> int:
        """Which student step is trained: uniform over the student's steps, drawn from a generator seeded by the
        training step, so every process picks the same one (the official code broadcasts it from rank 0) and a
        resumed run repeats it."""
        return draw_student_step(self.generator.num_steps, step)

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
        real, _ = self.real.draw(cond, noise.device)
        return self.generator.schedule.add_noise(real, noise, self.generator.time(k, noise))

    # ------------------------------------------------------------------ scores
    def real_x0(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: float | Tensor | None = None) -> Tensor:
        """x0 of the frozen teacher with classifier-free guidance (default: a draw of the real guidance), in
        float64. No autocast: the teacher runs in its own dtype, as the official code runs its bf16 real UNet
        (`sd_guidance.py`)."""
        if guidance is None:
            guidance = self.real_guidance(len(cond), x_t.device)
        with autocast_off(x_t.device):
            return self.teacher.predict(x_t, t, cond, guidance, dtype=torch.float64).x0

    def fake_x0(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: float | Tensor = 1.0) -> Tensor:
        """x0 of the critic's fake score (default: conditional, unguided), in float64; the fake score runs in full
        precision also under mixed precision, as in the official code ("autocast and no_grad doesn't work well
        together")."""
        out = self.fake_output(x_t, t, cond, guidance, full_precision=True)
        return self.teacher.schedule.to_x0_eps(out, x_t, t, dtype=torch.float64)[0]

    def fake_output(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: float | Tensor = 1.0,
                    full_precision: bool = False) -> Tensor:
        """Raw fake-score output with classifier-free guidance: the null and conditional branches in one batched
        call (guidance 1: the conditional branch alone)."""
        if isinstance(guidance, (int, float)) and guidance == 1.0:
            return self.critic(x_t, t, cond.fields, full_precision=full_precision)[0]
        out, _ = self.critic(torch.cat([x_t, x_t]), torch.cat([t, t]), cond.with_null(), full_precision=full_precision)
        out_uncond, out_cond = out.chunk(2)
        return apply_guidance(out_uncond, out_cond, guidance)

    def guided_x0(self, x_t: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """(x0_real, x0_fake) at one draw of the real guidance: the fake score unguided (fake_guidance=none, DMD2)
        or with the same scale, the same draw (same: SwiftBrush §3.2, SNOOPI's PG-SB, SiD-LSG)."""
        if self.config.fake_guidance == "none":
            return self.real_x0(x_t, t, cond), self.fake_x0(x_t, t, cond)
        guidance = self.real_guidance(len(cond), x_t.device)
        return self.real_x0(x_t, t, cond, guidance), self.fake_x0(x_t, t, cond, guidance)

    def critic_condition(self, cond: Cond) -> Cond:
        """The critic's training condition: each sample's replaced by the null condition with probability
        critic_null_prob, so that the fake score's null branch (which its guidance uses) is trained too."""
        return cond.null_with_prob(self.config.critic_null_prob)

    def gan_timesteps(self, n: int, device: torch.device) -> Tensor:
        T = self.teacher.schedule.num_train_timesteps
        if self.teacher.schedule.kind == "vp":
            return torch.randint(0, max(int(self.config.gan_max_step * T), 1), (n,), device=device)
        return self.teacher.schedule.sample_timesteps(n, 0.0, self.config.gan_max_step, device=device)

    # ------------------------------------------------------------------ losses
    def loss(self, phase: str, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """On a generator step the critic then trains on the same sample, drawn before the generator's update (the
        official `train_one_step` reuses it); on critic-only steps it draws one without gradient."""
        if phase == "critic" and self._sample is not None and self._sample[0] == step:
            _, x, cond = self._sample
            self._sample = None
            return self.critic_loss(x, cond)
        cond = self.source.encode(batch["cond_index"]).to(self.device).null_with_prob(self.config.generator_null_prob)
        noise = self.noise(len(cond))
        k = self.sampled_step(step)
        x_in = self.generator_input(noise, cond, k)
        t_k = self.generator.time(k, x_in)
        if phase == "generator":
            x = self.generator(x_in, cond, t_k)
            if self.config.critic_sample == "reuse":
                self._sample = (step, x.detach(), cond)
            return self.generator_loss(x, cond, batch)
        with torch.no_grad():
            x = self.generator(x_in, cond, t_k)
        return self.critic_loss(x, cond)

    def generator_loss(self, x: Tensor, cond: Cond, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Losses of the generator sample x (with gradient); "loss" is backpropagated."""
        raise NotImplementedError

    def gan_fields(self, cond: Cond) -> dict[str, Tensor]:
        """The conditioning of generator samples in the GAN: their prompts, or the null prompt when the real
        samples have no conditions of their own (otherwise the discriminator could tell the branches apart by
        their conditions alone)."""
        return cond.fields if self.real.conditional else cond.null

    def gan_generator_loss(self, x: Tensor, cond: Cond) -> Tensor:
        """Non-saturating GAN loss of generator samples (DMD2 §4.3); the gradient flows through the critic into G
        only."""
        with frozen(self.critic):
            t = self.gan_timesteps(x.shape[0], x.device)
            x_t = self.teacher.schedule.add_noise(x, torch.randn_like(x), t)
            _, logit = self.critic(x_t, t, self.gan_fields(cond), classify=True)
        return F.softplus(-logit).mean()

    def critic_loss(self, x: Tensor, cond: Cond) -> dict[str, Tensor]:
        """Fake-score denoising loss on detached generator samples over the full timestep range (DMD Eq. 6;
        the official code's unweighted MSE in the model's own parameterization), plus the GAN critic term."""
        c, schedule = self.config, self.teacher.schedule
        x = x.detach()
        t = schedule.sample_timesteps(x.shape[0], 0.0, 1.0, device=x.device)
        eps = torch.randn_like(x)
        x_t = schedule.add_noise(x, eps, t)
        out = self.fake_output(x_t, t, self.critic_condition(cond), c.critic_guidance)
        target = schedule.from_x0_eps(x.float(), eps.float(), t)
        if c.critic_weighting == "alpha2":  # SwiftBrush's MSE(alpha_t eps_fake, alpha_t eps)
            alpha = schedule.alpha_sigma(t)[0].float().reshape(-1, *([1] * (x.ndim - 1)))
            loss_denoise = F.mse_loss(alpha * out.float(), alpha * target.float())
        else:
            loss_denoise = F.mse_loss(out.float(), target.float())
        losses = {"denoise": loss_denoise}
        total = loss_denoise
        if self.real is not None and c.gan_critic_weight > 0:
            # each real sample with its own condition (its caption), and each branch with its own diffusion-GAN
            # timesteps, as the official `compute_cls_logits` draws them per call
            real, real_cond = self.real.draw(cond, x.device)
            t_fake, t_real = self.gan_timesteps(x.shape[0], x.device), self.gan_timesteps(real.shape[0], x.device)
            both = torch.cat([schedule.add_noise(x, torch.randn_like(x), t_fake),
                              schedule.add_noise(real, torch.randn_like(real), t_real)])
            fake_fields, real_fields = self.gan_fields(cond), self.gan_fields(real_cond)
            fields = {k: torch.cat([fake_fields[k], real_fields[k]]) for k in fake_fields}
            _, logits = self.critic(both, torch.cat([t_fake, t_real]), fields, classify=True)
            logit_fake, logit_real = logits.chunk(2)
            loss_d = F.softplus(logit_fake).mean() + F.softplus(-logit_real).mean()
            losses["gan_d"] = loss_d
            total = total + c.gan_critic_weight * loss_d
        losses["loss"] = total
        return losses


def draw_student_step(num_steps: int, step: int) -> int:
    """A student step uniform over `num_steps`, from a generator seeded by the training step `step`."""
    if num_steps == 1:
        return 0
    return int(torch.randint(0, num_steps, (1,), generator=torch.Generator().manual_seed(step)))


def real_guidance_sampler(config: ScoreDistillationConfig) -> GuidanceSampler:
    """The real score's guidance: fixed at real_guidance, or PG-SB's U[low, high] (real_guidance_range)."""
    if not config.real_guidance_range:
        return GuidanceSampler(config.real_guidance)
    if len(config.real_guidance_range) != 2 or config.real_guidance_range[0] > config.real_guidance_range[1]:
        raise ConfigError(f"objective.real_guidance_range={config.real_guidance_range} must be [low, high] with "
                          "low <= high, e.g. [0.5, 4.0] (SNOOPI's SD1.5 range), or [] for a fixed real_guidance")
    low, high = config.real_guidance_range
    return GuidanceSampler(low, high, config.real_guidance_draw)
