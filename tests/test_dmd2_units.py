"""DMD2 mechanics: signs and scales of the DM gradient, which modules each phase trains, the TTUR counts,
backward simulation and the GAN term, on the analytic teacher with tiny MLPs."""
import pytest
import torch

from stepdistill.config import load_config
from stepdistill.objectives import build_objective
from stepdistill.objectives.score_distillation.critic import Critic, classifier_head
from stepdistill.objectives.score_distillation.dmd2 import DMD2
from stepdistill.training import Trainer


def objective(overrides=()) -> DMD2:
    cfg = load_config("configs/dmd2_gmm.yaml", ["teacher.backbone_hidden=32", *overrides])
    return build_objective(cfg, "cpu")


def test_dm_gradient_matches_the_formula_and_vanishes_when_fake_equals_real():
    obj = objective()
    cond = obj.source.encode(torch.zeros(64, dtype=torch.long))
    x = torch.randn(64, 2, requires_grad=True)
    torch.manual_seed(1)
    loss, grad = obj.distribution_matching_loss(x, cond)
    loss.backward()
    # d/dx 0.5 mean((x - sg(x - g))^2) = g / numel
    torch.testing.assert_close(x.grad, grad / x.numel())
    # recompute grad = (x0_fake - x0_real) / mean|x - x0_real| with the same noise and timesteps
    torch.manual_seed(1)
    t = obj.teacher.schedule.sample_timesteps(64, obj.config.min_step, obj.config.max_step)
    x_t = obj.teacher.schedule.add_noise(x.detach(), torch.randn_like(x), t)
    x0_real = obj.teacher.predict(x_t, t, cond, 1.0, dtype=torch.float64).x0
    x0_fake = obj.teacher.predict(x_t, t, cond, 1.0, net=obj.critic.fake_score, dtype=torch.float64).x0
    expected = (x0_fake - x0_real) / (x.detach().double() - x0_real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(grad, expected.float(), atol=1e-5, rtol=1e-4)
    # a fake score equal to the real one gives no gradient
    obj.critic = Critic(_PassThroughTeacher(obj.teacher), _AnalyticNet(obj.teacher), with_head=False)
    _, grad_same = obj.distribution_matching_loss(x.detach(), cond)
    assert grad_same.abs().max() < 1e-5


class _AnalyticNet(torch.nn.Module):
    """A 'network' whose output is the analytic teacher's: fake score == real score."""

    def __init__(self, teacher, offset=None):
        super().__init__()
        self.teacher, self.offset = [teacher], offset
        self.blocks = torch.nn.ModuleList([torch.nn.Identity()])

    def forward(self, x, t, **fields):
        eps = self.teacher[0].model_output(x, t, fields)
        if self.offset is None:
            return eps
        alpha, sigma = self.teacher[0].schedule.alpha_sigma(t)
        return eps - (alpha / sigma)[:, None].float() * self.offset  # x0 = (x - s eps) / a moves by +offset


class _PassThroughTeacher:
    def __init__(self, teacher):
        self.teacher = teacher

    def call(self, net, x_t, t, fields):
        return net(x_t, t, **fields)


def test_dm_gradient_points_from_the_fake_toward_the_real_prediction():
    """A fake score whose x0 is the real x0 shifted by d gives grad = d / mean|x - x0_real|: descent moves
    samples by -d, away from the fake distribution toward the real one."""
    obj = objective()
    cond = obj.source.encode(torch.zeros(256, dtype=torch.long))
    d = torch.tensor([0.5, 0.0])
    obj.critic = Critic(_PassThroughTeacher(obj.teacher), _AnalyticNet(obj.teacher, offset=d), with_head=False)
    x = torch.randn(256, 2) * 0.3
    _, grad = obj.distribution_matching_loss(x, cond)
    assert (grad[:, 0] > 0).all() and grad[:, 1].abs().max() < 1e-4
    assert grad[:, 0].mean() > 0.1  # normalized: O(1) per sample whatever the scale of x - x0


def grads_by_module(obj: DMD2, phase: str) -> dict[str, bool]:
    for p in obj.parameters():
        p.grad = None
    batch = {"cond_index": torch.zeros(16, dtype=torch.long)}
    obj.loss(phase, batch, 0)["loss"].backward()
    return {
        "generator": any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.generator.parameters()),
        "fake_score": any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.critic.fake_score.parameters()),
        "head": obj.critic.head is not None and any(p.grad is not None and p.grad.abs().sum() > 0
                                                    for p in obj.critic.head.parameters()),
    }


def test_each_phase_trains_only_its_modules_with_the_gan_term():
    obj = objective(["objective.real_data=mixture"])
    assert grads_by_module(obj, "generator") == {"generator": True, "fake_score": False, "head": False}
    assert grads_by_module(obj, "critic") == {"generator": False, "fake_score": True, "head": True}
    assert all(p.requires_grad for p in obj.critic.parameters())  # restored after the generator's GAN pass
    losses = obj.loss("generator", {"cond_index": torch.zeros(16, dtype=torch.long)}, 0)
    assert set(losses) >= {"dm", "gan_g", "loss"}
    losses = obj.loss("critic", {"cond_index": torch.zeros(16, dtype=torch.long)}, 1)
    assert set(losses) >= {"denoise", "gan_d", "loss"}


def test_gan_is_off_without_real_data():
    obj = objective()
    assert obj.critic.head is None
    losses = obj.loss("critic", {"cond_index": torch.zeros(8, dtype=torch.long)}, 1)
    assert "gan_d" not in losses


def test_two_time_scale_update_counts(tmp_path):
    cfg = load_config("configs/dmd2_gmm.yaml", [f"train.output_dir={tmp_path}", "train.max_steps=20",
                                                "train.progress=false", "train.checkpoint_every=0",
                                                "objective.critic_updates=5", "teacher.backbone_hidden=32",
                                                "train.batch_size=16"])
    trainer = Trainer(cfg)
    counts = {"generator": 0, "critic": 0}
    for name, opt in trainer.optimizers.items():
        original = opt.step

        def counting(*a, _name=name, _orig=original, **k):
            counts[_name] += 1
            return _orig(*a, **k)

        opt.step = counting
    trainer.train()
    assert counts == {"generator": 4, "critic": 20}


def test_backward_simulation_feeds_the_sampler_input_without_grad():
    obj = objective(["student.timesteps=[999,749,499,249]", "teacher.backbone_hidden=32"])
    cond = obj.source.encode(torch.zeros(8, dtype=torch.long))
    noise = torch.randn(8, 2)
    seen = []
    original = obj.generator.forward
    step_of = {t: i for i, t in enumerate(obj.generator.timesteps)}

    def record(x_t, c, t):
        seen.append((step_of[float(t[0])], x_t.clone(), torch.is_grad_enabled()))
        return original(x_t, c, t)

    obj.generator.forward = record
    torch.manual_seed(5)
    obj.generator.sample(noise, cond, 4)  # the sampler: steps 0..3
    sampler_inputs = {s: x for s, x, _ in seen}
    seen.clear()
    torch.manual_seed(5)
    x_in = obj.generator_input(noise, cond, 3)
    assert [(s, g) for s, _, g in seen] == [(0, False), (1, False), (2, False)]
    torch.testing.assert_close(x_in, sampler_inputs[3])
    assert obj.generator_input(noise, cond, 0) is noise
    ks = {obj.sampled_step(step) for step in range(64)}
    assert ks == {0, 1, 2, 3} and obj.sampled_step(7) == obj.sampled_step(7)


@pytest.mark.parametrize("shape,expected_layers", [((1280, 8, 8), 1), ((1280, 32, 32), 3), ((64, 4, 4), 0)])
def test_classifier_head_follows_dmd2_downsampling(shape, expected_layers):
    """SD1.5's 8x8 bottleneck: one stride-2 conv then a 4x4 conv; SDXL's 32x32: three stride-2 convs."""
    head = classifier_head(shape)
    strided = [m for m in head if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == expected_layers
    assert head(torch.randn(2, *shape)).shape == (2, 1)


@pytest.mark.parametrize("channels,groups", [(1280, 32), (640, 32), (64, 8), (32, 4)])
def test_classifier_head_groups_keep_what_the_1x1_map_holds(channels, groups):
    """The official head's GroupNorm(32, 1280) normalizes 40 channels per group; with 32 groups on the digits
    teacher's 64-channel bottleneck each group held 2 channels, and a group of 2 on a 1x1 map normalizes to
    (+1, -1) or (-1, +1): only the sign of a difference survived, the discriminator stayed at chance
    (loss 2 ln 2 over 800 iterations) and the GAN could not help (docs/DMD2.md). At least 8 channels per group."""
    head = classifier_head((channels, 4, 4))
    norms = [m for m in head if isinstance(m, torch.nn.GroupNorm)]
    assert [m.num_groups for m in norms] == [groups]
    seen = []
    norms[-1].register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    head(torch.randn(16, channels, 4, 4))
    assert seen[0].abs().unique().numel() > 2 * 16  # graded activations, not +-1 per group


def test_optional_dmd_regression_term_uses_cached_teacher_pairs(tmp_path):
    """DMD v1's L_reg beside the DM loss: pairs cached once (the regression objective's cache), and the student's
    one-step output from the cached noise is pulled toward the teacher's ODE endpoint."""
    obj = objective(["objective.regression_weight=0.25", "objective.pairs.num=64", "objective.pairs.steps=4"])
    obj.prepare_data(str(tmp_path), "cpu")
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == ["meta.json", "pairs-00000.safetensors"]
    losses = obj.loss("generator", {"cond_index": torch.zeros(16, dtype=torch.long)}, 0)
    assert "regression" in losses
    torch.testing.assert_close(losses["loss"], losses["dm"] + 0.25 * losses["regression"])
    without = objective()
    assert "regression" not in without.loss("generator", {"cond_index": torch.zeros(16, dtype=torch.long)}, 0)
