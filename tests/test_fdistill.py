"""f-distill (arXiv 2502.15681) on DMD2's machinery: reverse KL is DMD2 itself, the weighting table is f''(r) r^2
of the paper's f's, the weights from an exact density ratio move mass toward the modes the student under-covers
(and an inverted ratio moves it away), the ratio's running mean per timestep bin is checkpointed state, and on the
8-Gaussian ring a JS student meets DMD2's bounds.

Measured with configs/dmd2_gmm.yaml + objective.real_data=mixture, 4000 steps, batch 128 (4096 samples, seed 1):
  DMD2 + GAN (h = 1)   seed 0: SW2 0.072, ED 0.0065, precision 0.65, mode TV 0.044
                       seed 1: SW2 0.080, ED 0.0080, precision 0.63, mode TV 0.049
  f-distill JS         seed 0: SW2 0.074, ED 0.0065, precision 0.66, mode TV 0.031
                       seed 1: SW2 0.076, ED 0.0072, precision 0.66, mode TV 0.031
"""
from __future__ import annotations

import math

import pytest
import torch

from stepdistill.config.schema import ConfigError
from stepdistill.evaluation.distribution import evaluate_generator
from stepdistill.objectives.score_distillation.fdistill import (
    WEIGHTINGS,
    FDistill,
    density_ratio,
    normalized_weights,
)
from stepdistill.teachers.gmm import GaussianMixture
from stepdistill.training.lean import build, optimize

CONFIG = "configs/dmd2_gmm.yaml"
GAN = ["objective.real_data=mixture"]

# f(r) of each divergence (the paper's Table 1; Neyman chi^2 beside them) and the constant c in h = c f''(r) r^2
# that the batch normalization of h removes
GENERATORS = {
    "rkl": (lambda r: -torch.log(r), 1.0),
    "kl": (lambda r: r * torch.log(r), 1.0),
    "js": (lambda r: r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2), 1.0),
    "sf": (lambda r: (r + 1) * torch.log(0.5 + 1 / (2 * r)), 1.0),
    "neyman": (lambda r: (1 - r) ** 2 / r, 0.5),
    "sh": (lambda r: 1 - r.sqrt(), 4.0),
    "jf": (lambda r: (r - 1) * torch.log(r), 1.0),
}


@pytest.mark.parametrize("divergence", sorted(WEIGHTINGS))
def test_each_weighting_is_f_second_derivative_times_r_squared(divergence):
    f, c = GENERATORS[divergence]
    r = torch.linspace(0.1, 20, 50, dtype=torch.float64, requires_grad=True)
    (df,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (d2f,) = torch.autograd.grad(df.sum(), r)
    torch.testing.assert_close(WEIGHTINGS[divergence](r.detach()), c * d2f * r.detach() ** 2)


def test_reverse_kl_is_dmd2():
    """h = 1: the same DM gradient as DMD2 for the same sample, noise and timesteps."""
    dmd2 = build(CONFIG, [*GAN], seed=0)
    rkl = build(CONFIG, ["objective.name=fdistill", "objective.divergence=rkl", *GAN], seed=0)
    cond = dmd2.source.encode(torch.arange(8) % max(dmd2.source.num_classes, 1))
    x = torch.randn(8, 2)
    torch.manual_seed(1)
    _, grad_dmd2 = dmd2.distribution_matching_loss(x, cond)
    torch.manual_seed(1)
    _, grad_rkl = rkl.distribution_matching_loss(x, cond)
    torch.testing.assert_close(grad_rkl, grad_dmd2, atol=0, rtol=0)
    assert grad_dmd2.abs().sum() > 0


def _noised_density(mixture: GaussianMixture, weights: torch.Tensor, x: torch.Tensor, alpha: float,
                    sigma: float) -> torch.Tensor:
    """The density at time t (x_t = alpha x0 + sigma eps) of a mixture of the ring's modes with `weights`."""
    var = alpha ** 2 * mixture.stds ** 2 + sigma ** 2  # [K]
    d2 = ((x[:, None, :] - alpha * mixture.means[None]) ** 2).sum(-1)  # [N, K]
    return (weights * torch.exp(-d2 / (2 * var)) / (2 * math.pi * var)).sum(-1)


@pytest.mark.parametrize("divergence", ["kl", "js", "jf", "sh"])
def test_weights_from_the_exact_ratio_favour_the_modes_the_student_under_covers(divergence):
    """A student q with mode 0 at a quarter of the teacher's weight: r = p_t / q_t > 1 there, so divergences whose
    h rises with r (KL, JS, Jeffreys, Hellinger) weight the DM gradient of those samples above the batch mean, where
    reverse KL (DMD2) weights all alike; the ratio inverted (the discriminator's labels swapped) weights them
    below it."""
    mixture = GaussianMixture.ring(8, 1.0, 0.1)
    p = torch.full((8,), 1 / 8, dtype=torch.float64)
    q = p.clone()
    q[0] /= 4
    q /= q.sum()
    g = torch.Generator().manual_seed(0)
    modes = torch.multinomial(q.float(), 8192, replacement=True, generator=g)
    x0 = mixture.means[modes] + 0.1 * torch.randn(8192, 2, generator=g, dtype=torch.float64)
    alpha, sigma = 0.95, 0.3
    x_t = alpha * x0 + sigma * torch.randn(8192, 2, generator=g, dtype=torch.float64)
    logit = torch.log(_noised_density(mixture, p, x_t, alpha, sigma) / _noised_density(mixture, q, x_t, alpha,
                                                                                        sigma))
    bins = torch.zeros(8192, dtype=torch.long)

    def mode0_weight(div: str, logits: torch.Tensor) -> float:
        r = density_ratio(logits)
        return float(normalized_weights(r, div, bins, r.mean().reshape(1))[modes == 0].mean())

    assert mode0_weight("rkl", logit) == pytest.approx(1.0)
    assert mode0_weight(divergence, logit) > 1.2
    assert mode0_weight(divergence, -logit) < 0.9


def test_f_distill_needs_the_gan_discriminator():
    with pytest.raises(ConfigError, match="set objective.real_data"):
        build(CONFIG, ["objective.name=fdistill"], seed=0)


def test_the_ratios_running_mean_per_timestep_bin_is_critic_state():
    objective = build(CONFIG, ["objective.name=fdistill", "objective.ratio_ema=0.5", *GAN], seed=0)
    assert isinstance(objective, FDistill)
    assert "ratio_means" in objective.critic.state_dict()
    t = torch.tensor([10.0, 20.0, 990.0])
    bins = objective.timestep_bins(t)
    assert bins.tolist() == [0, 0, 9]
    means = objective.update_ratio_means(torch.tensor([2.0, 4.0, 0.5]), bins)
    torch.testing.assert_close(means[[0, 9, 5]], torch.tensor([0.5 * 1 + 0.5 * 3.0, 0.5 * 1 + 0.5 * 0.5, 1.0]))


def passes(report) -> bool:
    """DMD2's acceptance bounds on the ring (tests/test_dmd2_gmm.py)."""
    return (report.energy <= 0.012 and report.sw2 <= 0.10 and report.precision >= 0.60
            and report.mode_tv <= 0.10)


@pytest.mark.slow
def test_a_jensen_shannon_student_meets_dmd2s_bounds():
    objective = optimize(build(CONFIG, ["objective.name=fdistill", "objective.divergence=js", *GAN], seed=0),
                         4000, 128, seed=0)
    report = evaluate_generator(objective.generator, seed=1)
    assert passes(report), report


def _real_images(folder, n: int = 4, size: int = 16):
    """Captioned random 16 px images: the tiny pipelines' real-image folder."""
    import json

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": "a photo of a cat"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.parametrize("kind,timesteps", [("sd", [999]), ("sd3", [1000.0])])
def test_the_sd15_preset_trains_resumes_exports_and_reloads_on_tiny_pipelines(kind, timesteps, tmp_path):
    import json

    from diffusers import DiffusionPipeline

    from stepdistill.config import load_config
    from stepdistill.pipelines import RECIPE_FILE
    from stepdistill.teachers.tiny import save_tiny_pipeline
    from stepdistill.training import Trainer

    folder = save_tiny_pipeline(kind, tmp_path / kind)
    images = _real_images(tmp_path / "images")
    out = tmp_path / "run"

    def overrides(steps: int, extra=()):
        return [f"teacher.kind={kind}", f"teacher.path={folder}", f"student.timesteps={timesteps}",
                f"data.image_dir={images}", f"train.output_dir={out}", f"train.max_steps={steps}",
                "train.batch_size=2", "train.checkpoint_every=2", "train.report_to=none", "train.progress=false",
                "train.num_validation_samples=1", "train.mixed_precision='no'", "train.gradient_checkpointing=false",
                "train.lr_warmup_steps=0", "objective.critic_updates=1", "objective.generator_lr=1e-4", *extra]

    Trainer(load_config("configs/fdistill_sd15.yaml", overrides(2))).train()
    trainer = Trainer(load_config("configs/fdistill_sd15.yaml", overrides(3, ["train.resume=latest"])))
    result = trainer.train()
    assert result.step == 3 and {int(s["step"]) for s in trainer.optimizers["generator"].state.values()} == {3}
    ratio_means = trainer.objective.critic.ratio_means
    assert ratio_means.shape == (10,) and not torch.equal(ratio_means, torch.ones(10))  # updated and resumed
    pipe = DiffusionPipeline.from_pretrained(str(result.final_dir))
    recipe = json.loads((result.final_dir / RECIPE_FILE).read_text())
    latents = pipe("a photo of a cat", output_type="latent", **recipe["pipeline_kwargs"]).images
    assert recipe["objective"] == "fdistill" and pipe.scheduler.timesteps.tolist() == pytest.approx(timesteps)
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_the_gan_head_of_a_joint_attention_critic_reads_the_image_tokens(kind):
    """SD3 / Flux blocks return (text tokens, image tokens); the discriminator's density ratio is of images, so
    the head's features are the image tokens (16 of them on the tiny 8 x 8 latents in 2 x 2 patches)."""
    from stepdistill.objectives.score_distillation.critic import Critic, build_fake_score
    from stepdistill.teachers.loading import detect_kind, teacher_class
    from stepdistill.teachers.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(kind)
    teacher = teacher_class(detect_kind(pipe))(pipe)
    critic = Critic(teacher, build_fake_score(teacher, "full", 4), with_head=True)
    x = torch.randn(2, *teacher.sample_shape)
    _, features = critic._run(x, torch.full((2,), 500.0), teacher.encode(["a cat", "a dog"]).fields)
    assert features.shape[:2] == (2, 16)
