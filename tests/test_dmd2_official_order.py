"""DMD2 where it used to differ from the official code (tianweiy/DMD2 `train_sd.py`, `sd_guidance.py`): the GAN's
real branch with each real sample's own caption and its own diffusion-GAN timesteps, the critic trained on the
generator's pre-update sample (objective.critic_sample=reuse), learning-rate schedules and the generator EMA per iteration, and the DM forwards in
full precision under mixed precision. Each test would fail on the old behaviour."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.config import load_config
from stepdistill.objectives import build_objective
from stepdistill.objectives.score_distillation.dmd2 import DMD2
from stepdistill.teachers.tiny import save_tiny_pipeline
from stepdistill.training import Trainer


def gmm_objective(overrides=()) -> DMD2:
    cfg = load_config("configs/dmd2_gmm.yaml", ["teacher.backbone_hidden=32", *overrides])
    return build_objective(cfg, "cpu")


def record_calls(obj, name):
    """Wrap obj.<name> and return the list of (args, kwargs, result) of its calls."""
    calls, original = [], getattr(obj, name)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    setattr(obj, name, spy)
    return calls


@pytest.fixture(scope="module")
def captioned_images(tmp_path_factory):
    """A tiny SD teacher and four real images captioned with prompts the training batch never uses."""
    root = tmp_path_factory.mktemp("gan")
    teacher = save_tiny_pipeline("sd", root / "sd")
    images = root / "real"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(["a red square", "a red square", "a blue circle", "a green star"]):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a cat\na photo of a dog\n")
    return teacher, images, prompts


def sd_objective(teacher, images, prompts, out) -> DMD2:
    cfg = load_config("configs/dmd2_sd15.yaml", [
        f"teacher.path={teacher}", f"data.prompts_file={prompts}", "objective.real_data=images",
        f"data.image_dir={images}", f"train.output_dir={out}", "train.mixed_precision='no'"])
    obj = build_objective(cfg, "cpu")
    obj.prepare_data(str(out), "cpu")
    return obj


def gan_call(obj, batch, step=1):
    """The critic's classify call of one critic step: (inputs x_t, timesteps, fields)."""
    calls = record_calls(obj.critic, "forward")
    obj.loss("critic", batch, step)
    (x_t, t, fields), _, _ = next(c for c in calls if c[1].get("classify"))
    return x_t, t, fields


def test_gan_real_branch_is_conditioned_on_each_real_images_own_caption(captioned_images, tmp_path):
    """Official `compute_guidance_clean_cls_loss`: real latents with their own text embeddings. Here the batch asks
    for cats and dogs while the real images are squares, circles and stars: labelling them "cat" would let the
    discriminator learn the wrong pairing."""
    obj = sd_objective(*captioned_images, tmp_path)
    drawn = record_calls(obj.real.images, "draw")
    batch = {"cond_index": torch.tensor([0, 1, 0, 1])}
    _, _, fields = gan_call(obj, batch)
    captions = drawn[0][2][1]
    n = len(captions)
    expected_real = obj.teacher.encode(captions).fields
    expected_fake = obj.source.encode(batch["cond_index"]).fields
    for key, value in fields.items():
        torch.testing.assert_close(value[n:], expected_real[key])
        torch.testing.assert_close(value[:n], expected_fake[key])
    assert not torch.equal(expected_real["encoder_hidden_states"], expected_fake["encoder_hidden_states"])


def test_uncaptioned_real_images_make_both_gan_branches_unconditional(captioned_images, tmp_path):
    """Without captions the real samples have no condition; giving only the fake branch its prompts would let the
    discriminator separate the branches by the prompt alone, so both get the null prompt."""
    teacher, images, prompts = captioned_images
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in images.glob("*.png"):
        (plain / f.name).write_bytes(f.read_bytes())
    obj = sd_objective(teacher, plain, prompts, tmp_path / "run")
    batch = {"cond_index": torch.tensor([0, 1])}
    _, _, fields = gan_call(obj, batch)
    null = obj.source.encode(batch["cond_index"]).null
    for key, value in fields.items():
        torch.testing.assert_close(value, torch.cat([null[key], null[key]]))
    gen_calls = record_calls(obj.critic, "forward")
    obj.loss("generator", batch, 0)
    (_, _, gen_fields), _, _ = next(c for c in gen_calls if c[1].get("classify"))
    for key, value in gen_fields.items():
        torch.testing.assert_close(value, null[key])


def test_real_and_fake_gan_samples_get_their_own_timesteps():
    """Official `compute_cls_logits` draws t ~ U[0, gan_max_step T) per call, i.e. per branch."""
    obj = gmm_objective(["objective.real_data=mixture", "objective.gan_max_step=0.5"])
    _, t, _ = gan_call(obj, {"cond_index": torch.zeros(64, dtype=torch.long)})
    t_fake, t_real = t.chunk(2)
    assert not torch.equal(t_fake, t_real)
    assert 0 <= t.min() and t.max() < 500


def test_critic_trains_on_the_generator_sample_drawn_before_the_generator_update():
    """Official `train_one_step`: the guidance (critic) turn reuses the generator turn's images, made before the
    generator's optimizer step (objective.critic_sample=reuse); on critic-only steps it samples the generator without
    gradient. With the default critic_sample=fresh the critic turn samples the updated generator."""
    fresh = gmm_objective(["objective.critic_updates=2"])
    batch = {"cond_index": torch.zeros(16, dtype=torch.long)}
    made = record_calls(fresh.generator, "forward")
    fresh.loss("generator", batch, 0)
    fresh.loss("critic", batch, 0)
    assert len(made) == 2  # fresh: the critic's own sample
    obj = gmm_objective(["objective.critic_updates=2", "objective.critic_sample=reuse"])
    batch = {"cond_index": torch.zeros(16, dtype=torch.long)}
    made = record_calls(obj.generator, "forward")
    seen = record_calls(obj, "critic_loss")
    obj.loss("generator", batch, 0)
    before_update = made[-1][2].detach().clone()
    with torch.no_grad():
        for p in obj.generator.parameters():  # stands in for the generator's optimizer step
            p.add_(1.0)
    obj.loss("critic", batch, 0)
    torch.testing.assert_close(seen[-1][0][0], before_update)
    assert len(made) == 1  # the critic phase did not run the (updated) generator again
    obj.loss("critic", batch, 1)  # a critic-only step: a fresh sample of the current generator, no gradient
    assert len(made) == 2 and not seen[-1][0][0].requires_grad
    assert not torch.allclose(seen[-1][0][0], before_update)


def test_schedules_step_every_iteration_and_the_ema_only_with_generator_updates(tmp_path):
    """Official `train_one_step` steps both learning-rate schedulers every iteration: a 10-step warm-up ends after
    10 iterations whatever the critic ratio (not after 10 generator updates = 50 iterations at ratio 5). The EMA
    averages generator weights, so it advances only when they change (2 updates in 10 iterations)."""
    cfg = load_config("configs/dmd2_gmm.yaml", [
        f"train.output_dir={tmp_path}", "train.max_steps=10", "train.progress=false", "train.checkpoint_every=0",
        "objective.critic_updates=5", "teacher.backbone_hidden=32", "train.batch_size=16",
        "train.lr_scheduler=constant_with_warmup", "train.lr_warmup_steps=10", "train.ema_decay=0.9"])
    trainer = Trainer(cfg)
    logs = trainer.train_steps(5)
    assert logs["lr/generator"] == pytest.approx(0.5 * cfg.objective.generator_lr)
    assert logs["lr/critic"] == pytest.approx(0.5 * cfg.objective.critic_lr)
    logs = trainer.train_steps(5)
    assert logs["lr/generator"] == pytest.approx(cfg.objective.generator_lr)
    assert logs["lr/critic"] == pytest.approx(cfg.objective.critic_lr)
    assert trainer.ema.optimization_step == 2


class FakeScoreUnderAutocast(DMD2):
    """Defect: the fake score of the DM gradient runs under the prepared critic's autocast."""

    def fake_x0(self, x_t, t, cond):
        out, _ = self.critic(x_t, t, cond.fields)
        return self.teacher.schedule.to_x0_eps(out, x_t, t, dtype=torch.float64)[0]


def test_dm_gradient_is_full_precision_under_bf16_autocast():
    """Under train.mixed_precision=bf16 accelerate runs a prepared module's forward in autocast (here emulated on
    CPU: the critic's forward wrapped in bf16 autocast, and the whole loss inside one as well). The DM gradient
    must still equal the fp32 formula: the official `compute_distribution_matching_loss` runs the fake score in
    full precision. Under autocast the gradient moves by ~1e-2."""
    obj = gmm_objective()
    forward = obj.critic.forward

    def autocast_forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    obj.critic.forward = autocast_forward
    cond = obj.source.encode(torch.zeros(256, dtype=torch.long))
    x = torch.randn(256, 2)

    def dm_gradient(objective):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return objective.distribution_matching_loss(x, cond)[1]

    torch.manual_seed(1)
    t = obj.teacher.schedule.sample_timesteps(256, obj.config.min_step, obj.config.max_step)
    x_t = obj.teacher.schedule.add_noise(x, torch.randn_like(x), t)
    x0_real = obj.teacher.predict(x_t, t, cond, obj.config.real_guidance, dtype=torch.float64).x0
    x0_fake = obj.teacher.predict(x_t, t, cond, 1.0, net=obj.critic.fake_score, dtype=torch.float64).x0
    expected = ((x0_fake - x0_real) / (x.double() - x0_real).abs().mean(1, keepdim=True)).float()
    torch.testing.assert_close(dm_gradient(obj), expected, atol=1e-5, rtol=1e-4)
    obj.__class__ = FakeScoreUnderAutocast
    assert (dm_gradient(obj) - expected).abs().max() > 1e-3
