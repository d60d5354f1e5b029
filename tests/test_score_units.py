"""The score-distillation family's shared pieces for VSD (SwiftBrush), SNOOPI's PG-SB and SiD: signs and scales of
the gradients against the formulas, the same guidance draw on both scores, which modules each phase trains, the
critic's null-condition dropout, guidance and weighting, on the analytic teacher with tiny MLPs."""
import pytest
import torch

from stepdistill.config import ConfigError, load_config
from stepdistill.guidance import GuidanceSampler
from stepdistill.objectives import build_objective
from stepdistill.objectives.score_distillation.critic import Critic
from stepdistill.objectives.score_distillation.gradients import (
    score_identity_loss,
    variational_score_gradient,
)

TINY = ["teacher.backbone_hidden=32"]
GUIDED = ["teacher.num_classes=4", "objective.real_guidance_range=[1.0,4.0]", "objective.critic_null_prob=0.1"]


def objective(config: str, overrides=()):
    return build_objective(load_config(config, [*TINY, *overrides]), "cpu")


class AnalyticNet(torch.nn.Module):
    """A 'network' whose output is the analytic teacher's, optionally with its x0 moved by `offset`."""

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


class PassThrough:
    def __init__(self, teacher):
        self.teacher = teacher

    def call(self, net, x_t, t, fields):
        return net(x_t, t, **fields)


def with_fake(obj, offset=None):
    obj.critic = Critic(PassThrough(obj.teacher), AnalyticNet(obj.teacher, offset), with_head=False)
    return obj


def test_vsd_gradient_is_sigma_squared_eps_difference():
    """SwiftBrush Eq. 5: grad = sigma_t^2 (eps_real - eps_fake), recomputed from the two eps predictions, and the
    surrogate loss backpropagates grad / numel into the sample."""
    obj = objective("configs/vsd_gmm.yaml")
    cond = obj.source.encode(torch.zeros(64, dtype=torch.long))
    x = torch.randn(64, 2, requires_grad=True)
    torch.manual_seed(1)
    loss, grad = obj.variational_score_loss(x, cond)
    loss.backward()
    torch.testing.assert_close(x.grad, grad / x.numel())
    torch.manual_seed(1)
    schedule = obj.teacher.schedule
    t = schedule.sample_timesteps(64, obj.config.min_step, obj.config.max_step)
    x_t = schedule.add_noise(x.detach(), torch.randn_like(x), t)
    eps_real = obj.teacher.predict(x_t, t, cond, 1.0, dtype=torch.float64).eps
    eps_fake = obj.teacher.predict(x_t, t, cond, 1.0, net=obj.critic.fake_score, dtype=torch.float64).eps
    sigma = schedule.alpha_sigma(t)[1][:, None]
    torch.testing.assert_close(grad, (sigma**2 * (eps_real - eps_fake)).float(), atol=1e-5, rtol=1e-4)


def test_vsd_gradient_points_from_the_fake_toward_the_real_prediction_unnormalized():
    """A fake x0 shifted by d gives grad = alpha_t sigma_t d: descent moves samples by -d, and, unlike DMD's,
    the size follows alpha_t sigma_t (no per-sample normalization)."""
    d = torch.tensor([[0.5, 0.0]])
    x0 = torch.randn(5, 2)
    alpha, sigma = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1]), torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    grad = variational_score_gradient(x0, x0 + d, alpha, sigma)
    torch.testing.assert_close(grad, (alpha * sigma)[:, None] * d)
    obj = with_fake(objective("configs/vsd_gmm.yaml"), offset=d[0])
    _, grad = obj.variational_score_loss(torch.randn(256, 2) * 0.3, obj.source.encode(torch.zeros(256).long()))
    assert (grad[:, 0] > 0).all() and grad[:, 1].abs().max() < 1e-4


def test_same_guidance_draw_on_both_scores_cancels_when_fake_equals_real():
    """PG-SB: kappa ~ U(1, 4) per sample, the same draw for the teacher and the fake score. A fake score equal to
    the teacher then gives no gradient; guiding only the teacher (fake_guidance=none) does not cancel."""
    x = torch.randn(128, 2) * 0.5
    labels = torch.arange(128) % 4
    obj = with_fake(objective("configs/vsd_gmm.yaml", GUIDED))
    _, grad = obj.variational_score_loss(x, obj.source.encode(labels))
    assert grad.abs().max() < 1e-5
    obj = with_fake(objective("configs/vsd_gmm.yaml", [*GUIDED, "objective.fake_guidance=none"]))
    _, grad = obj.variational_score_loss(x, obj.source.encode(labels))
    assert grad.abs().max() > 1e-3


def test_guidance_sampler_draws_per_sample_or_per_batch_within_the_range():
    torch.manual_seed(0)
    per_sample = GuidanceSampler(0.5, 4.0)(1000)
    per_batch = GuidanceSampler(0.5, 4.0, per="batch")(1000)
    assert per_sample.min() >= 0.5 and per_sample.max() <= 4.0 and per_sample.std() > 0.9  # U(0.5, 4): std 1.01
    assert per_batch.shape == (1000,) and (per_batch == per_batch[0]).all() and 0.5 <= per_batch[0] <= 4.0
    assert GuidanceSampler(3.0)(8) == 3.0


def test_pg_sb_random_guidance_is_usable_by_dmd2_through_config():
    """DMD2 with objective.real_guidance_range draws the real score's scale per sample; with fake_guidance=same
    its fake score takes the same draw (cancelling against an identical fake score)."""
    obj = objective("configs/dmd2_gmm.yaml", GUIDED)
    x_t, t = torch.randn(256, 2), torch.full((256,), 300)
    cond = obj.source.encode(torch.arange(256) % 4)
    first, second = obj.real_x0(x_t, t, cond), obj.real_x0(x_t, t, cond)
    assert (first - second).abs().max() > 1e-3  # a new draw each call
    obj = with_fake(objective("configs/dmd2_gmm.yaml", [*GUIDED, "objective.fake_guidance=same"]))
    x0_real, x0_fake = obj.guided_x0(x_t, t, cond)
    torch.testing.assert_close(x0_real, x0_fake)


def test_real_guidance_range_is_checked():
    with pytest.raises(ConfigError, match="objective.real_guidance_range"):
        objective("configs/vsd_gmm.yaml", ["objective.real_guidance_range=[4.0,1.0]"])
    with pytest.raises(ConfigError, match="real_guidance_draw"):
        load_config("configs/vsd_gmm.yaml", ["objective.real_guidance_draw=iteration"])


def test_sid_loss_gradient_with_constant_scores_moves_toward_the_real_one():
    """With both scores held fixed, SiD's loss has d/dx = -(f_real - f_fake) / mean|x - f_real| per sample (any
    alpha), averaged over the batch: descent moves x toward the real score's x0."""
    x = torch.randn(4, 3, requires_grad=True)
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    score_identity_loss(x, real, fake, alpha=1.2).backward()
    weight = (x.detach() - real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(x.grad, -(real - fake) / weight / 4)


def test_sid_loss_matches_the_alpha_form():
    """(f_r - f_f).((f_r - x) - alpha (f_r - f_f)) = (1 - alpha)|f_r - f_f|^2 + (f_r - f_f).(f_f - x) (SiD §4)."""
    x, real, fake = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    weight = (x - real).abs().mean(1, keepdim=True)
    d = real - fake
    expected = (((1 - 1.2) * d**2 + d * (fake - x)) / weight).sum(1).mean()
    torch.testing.assert_close(score_identity_loss(x, real, fake, 1.2), expected)


def test_sid_differentiates_through_both_scores():
    """The generator gradient of SiD includes the scores' Jacobians: it differs from the same loss with both x0
    estimates detached, and the critic's weights get none of it."""
    obj = objective("configs/sid_gmm.yaml")
    cond = obj.source.encode(torch.zeros(32, dtype=torch.long))
    x = torch.randn(32, 2, requires_grad=True)
    torch.manual_seed(2)
    _, real, fake = obj.score_identity_terms(x, cond)
    score_identity_loss(x, real, fake, 1.2).backward()
    through = x.grad.clone()
    x.grad = None
    score_identity_loss(x, real.detach(), fake.detach(), 1.2).backward()
    assert (through - x.grad).abs().max() > 1e-4 * x.grad.abs().max()
    assert all(p.grad is None for p in obj.critic.parameters())
    assert all(p.requires_grad for p in obj.critic.parameters())


def grads_by_module(obj, phase: str) -> dict[str, bool]:
    for p in obj.parameters():
        p.grad = None
    obj.loss(phase, {"cond_index": torch.arange(16) % max(len(obj.source), 1)}, 0)["loss"].backward()
    return {"generator": any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.generator.parameters()),
            "critic": any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.critic.parameters())}


@pytest.mark.parametrize("config", ["configs/vsd_gmm.yaml", "configs/sid_gmm.yaml"])
def test_each_phase_trains_only_its_modules(config):
    obj = objective(config, GUIDED)
    assert grads_by_module(obj, "generator") == {"generator": True, "critic": False}
    assert grads_by_module(obj, "critic") == {"generator": False, "critic": True}


def test_critic_null_dropout_guidance_and_alpha2_weighting():
    """critic_null_prob replaces that share of conditions by the null one; critic_weighting=alpha2 is SwiftBrush's
    MSE(alpha_t eps_fake, alpha_t eps); critic_guidance (SiD-LSG's kappa_1) guides the output being trained."""
    obj = objective("configs/vsd_gmm.yaml", ["teacher.num_classes=4", "objective.critic_null_prob=0.25"])
    cond = obj.source.encode(torch.zeros(4000, dtype=torch.long))
    dropped = obj.critic_condition(cond).fields["class_labels"] == 4
    assert 0.22 < dropped.float().mean() < 0.28
    x = torch.randn(64, 2)
    cond = obj.source.encode(torch.zeros(64, dtype=torch.long))
    for kappa in (1.0, 2.5):
        obj.config.critic_null_prob, obj.config.critic_guidance = 0.0, kappa
        torch.manual_seed(3)
        loss = obj.critic_loss(x, cond)["denoise"]
        torch.manual_seed(3)
        schedule = obj.teacher.schedule
        t = schedule.sample_timesteps(64, 0.0, 1.0)
        eps = torch.randn_like(x)
        x_t = schedule.add_noise(x, eps, t)
        out = obj.teacher.guided_output(x_t, t, cond, kappa, net=obj.critic.fake_score)
        alpha = schedule.alpha_sigma(t)[0].float()[:, None]
        torch.testing.assert_close(loss, ((alpha * (out - eps)) ** 2).mean())


def test_generator_null_prob_samples_the_null_prompt_and_matches_the_unguided_real_score():
    """generator_null_prob draws that share of generator samples (on generator and critic steps alike) for the null
    condition; for those the guided real score is the teacher's unguided null prediction, whatever real_guidance."""
    obj = objective("configs/dmd2_gmm.yaml", ["teacher.num_classes=4", "objective.real_guidance=3.0",
                                              "objective.generator_null_prob=0.3"])
    seen = []
    forward = obj.generator.forward

    def spy(x, cond, t):
        seen.append(cond.fields["class_labels"].clone())
        return forward(x, cond, t)

    obj.generator.forward = spy
    batch = {"cond_index": torch.arange(2000) % len(obj.source)}
    obj.loss("critic", batch, 1)
    obj.loss("generator", batch, 2)
    for labels in seen:
        assert 0.26 < (labels == 4).float().mean() < 0.34
    null = obj.source.encode(torch.zeros(64, dtype=torch.long)).dropped(torch.ones(64, dtype=torch.bool))
    x_t, t = torch.randn(64, 2), torch.full((64,), 500)
    unguided = obj.teacher.predict(x_t, t, null, 1.0, dtype=torch.float64).x0
    torch.testing.assert_close(obj.real_x0(x_t, t, null), unguided)


def test_generator_null_prob_with_a_gan_is_refused():
    with pytest.raises(ConfigError, match="generator_null_prob"):
        objective("configs/dmd2_gmm.yaml", ["teacher.num_classes=4", "objective.generator_null_prob=0.1",
                                            "objective.real_data=mixture"])
