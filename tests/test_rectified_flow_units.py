"""The rectified-flow family's pieces on the analytic teacher: signs and scales of the reflow loss, SlimFlow's annealed
coupling and two-step target, gradients reaching only the student, an exported k-RF loaded back as the next round's
teacher, and the refusals (a VP student, a 1-step export as teacher, LPIPS without its weights)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from stepdistill.cli import main
from stepdistill.config import ConfigError, load_config
from stepdistill.evaluation.straightness import straightness
from stepdistill.objectives import build_objective
from stepdistill.objectives.perceptual import backbone_weights_file
from stepdistill.schedules import NoiseSchedule
from stepdistill.students import FlowGenerator


class ConstantVelocity(nn.Module):
    """A backbone whose output is the same vector everywhere."""

    def __init__(self, velocity) -> None:
        super().__init__()
        self.velocity = nn.Parameter(torch.as_tensor(velocity, dtype=torch.float32).clone())

    def forward(self, x, t, class_labels=None):
        return self.velocity.expand_as(x)


def reflow(tmp_path, *overrides):
    cfg = load_config("configs/reflow_gmm.yaml", [f"train.output_dir={tmp_path}", "objective.pairs.num=64",
                                                  "objective.pairs.steps=10", *overrides])
    return build_objective(cfg, "cpu")


def test_reflow_loss_is_zero_for_the_exact_velocity_of_a_straight_coupling(tmp_path):
    """The coupling x = z + c is straight and never crosses: its velocity field is u = z - x = -c at every (x_t, t)
    (package convention, u = eps - x0). The loss is 0 for u = -c and |2c|^2 / 2 per element for u = +c."""
    objective = reflow(tmp_path)
    c = torch.tensor([0.3, -0.5])
    z = torch.randn(512, 2)
    batch = {"noise": z, "x0": z + c, "cond_index": torch.zeros(512, dtype=torch.long)}
    objective.generator.backbone = ConstantVelocity(-c)
    assert float(objective.loss("generator", batch, 0)["loss"].detach()) < 1e-12
    objective.generator.backbone = ConstantVelocity(c)
    assert float(objective.loss("generator", batch, 0)["loss"].detach()) == pytest.approx(float((2 * c).pow(2).mean()))


def test_reflow_gradients_reach_only_the_student_and_the_export_samples_any_number_of_steps(tmp_path):
    objective = reflow(tmp_path / "run", "objective.sample_steps=3")
    objective.prepare_data(str(tmp_path / "run"), "cpu")
    pairs = objective.dataset().tensors
    loss = objective.loss("generator", {k: v[:32] for k, v in pairs.items()}, 0)["loss"]
    loss.backward()
    grads = [p.grad for p in objective.generator.backbone.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    generator = objective.generator
    assert isinstance(generator, FlowGenerator) and generator.timesteps == [1000.0, 500.5, 1.0]
    recipe = generator.recipe()
    assert recipe.any_num_steps and recipe.sampler == "ode" and recipe.schedule.kind == "flow"
    noise = torch.randn(16, 2)
    cond = objective.teacher.encode(torch.zeros(16, dtype=torch.long))
    path = list(generator.trajectory(noise, cond, 5))
    assert [s for _, s in path] == pytest.approx([1.0, 0.75025, 0.5005, 0.25075, 0.001, 0.0])
    torch.testing.assert_close(path[-1][0], generator.sample(noise, cond, num_steps=5))


def test_slimflow_annealed_coupling_goes_from_independent_to_the_teachers(tmp_path):
    """SlimFlow Eq. 9: z~ = sqrt(1 - beta^2) z + beta z', beta = 1 - k / K floored at 0; z~ stays unit Gaussian."""
    objective = reflow(tmp_path, "objective.anneal_steps=100")
    assert [objective.anneal_beta(k) for k in (0, 50, 100, 400)] == [1.0, 0.5, 0.0, 0.0]
    z = torch.randn(20000, 2)
    for step, beta in ((0, 1.0), (50, 0.5)):
        mixed = objective.coupling_noise(z, step)
        correlation = float((mixed * z).mean() / (mixed.std() * z.std()))
        assert correlation == pytest.approx((1 - beta**2) ** 0.5, abs=0.02)
        assert float(mixed.std()) == pytest.approx(1.0, abs=0.02)
    assert torch.equal(objective.coupling_noise(z, 100), z)


def test_straightness_is_zero_for_straight_paths_and_positive_for_bent_ones():
    z, x = torch.randn(64, 2), torch.randn(64, 2)
    straight = [((1 - s) * x + s * z, s) for s in (1.0, 0.7, 0.2, 0.0)]
    assert straightness(straight) < 1e-12
    bent = [(z, 1.0), (x, 0.5), (x, 0.0)]  # all the way in the first half, then still: S = |x - z|^2
    assert straightness(bent) == pytest.approx(float((x - z).pow(2).sum(1).mean()), rel=1e-6)


@pytest.fixture(scope="module")
def exported_two_rf(tmp_path_factory):
    """A briefly trained 2-RF of the analytic teacher, exported as the rf2 stage would be."""
    root = tmp_path_factory.mktemp("rf2")
    objective = reflow(root, "objective.sample_steps=4")
    objective.prepare_data(str(root), "cpu")
    pairs = objective.dataset().tensors
    optimizer = torch.optim.AdamW(objective.generator.backbone.parameters(), lr=1e-3)
    for step in range(20):
        optimizer.zero_grad()
        objective.loss("generator", {k: v[:32] for k, v in pairs.items()}, step)["loss"].backward()
        optimizer.step()
    folder = objective.export(objective.generator, root / "final")
    return objective.generator, folder


def test_an_exported_flow_is_the_next_rounds_teacher(exported_two_rf, tmp_path):
    """teacher.kind=mlp: the export's ODE (Euler on its flow schedule) is the exported 2-RF's own sampler, and the
    next round's student starts from the 2-RF's weights."""
    generator, folder = exported_two_rf
    objective = reflow(tmp_path, "teacher.kind=mlp", f"teacher.path={folder}", "student.schedule=teacher")
    teacher = objective.teacher
    assert teacher.schedule == NoiseSchedule.flow(1.0) and teacher.mixture is not None
    assert str(folder.resolve()) in teacher.identity
    noise = torch.randn(64, 2)
    cond = teacher.encode(torch.zeros(64, dtype=torch.long))
    torch.testing.assert_close(teacher.sample(noise, cond, 4), generator.sample(noise, cond, 4))
    start = objective.generator.backbone.state_dict()
    assert all(torch.equal(v, generator.backbone.state_dict()[k]) for k, v in start.items())
    assert all(p.requires_grad for p in objective.generator.backbone.parameters())
    assert not any(p.requires_grad for p in teacher.backbone.parameters())


def test_flow_guided_two_step_target_and_gradients(exported_two_rf, tmp_path):
    """SlimFlow Eq. 12: x~ = x_s - s u_kRF(x_s) after the student's step x_s = z + (s - 1) u_s. With a teacher
    velocity equal to the student's (a straight field), x~ is the student's own one-step sample z - u_s."""
    _, folder = exported_two_rf
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "objective.name=flow_guided", "teacher.kind=mlp",
                             f"teacher.path={folder}", "student.schedule=teacher", "student.timesteps=[1000]",
                             "objective.pairs.num=64", "objective.pairs.steps=4"])
    objective = build_objective(cfg, "cpu")
    z = torch.randn(128, 2)
    cond = objective.teacher.encode(torch.zeros(128, dtype=torch.long))
    u = torch.randn(128, 2)
    objective.teacher.backbone = ConstantVelocity(0.0)
    s = torch.full((128,), 0.4, dtype=torch.float64)
    torch.testing.assert_close(objective.two_step_target(z, u, cond, s), z + (0.4 - 1) * u)
    objective.teacher.backbone = ConstantVelocity([0.2, -0.1])
    target = objective.two_step_target(z, torch.tensor([0.2, -0.1]).expand(128, 2), cond, s)
    torch.testing.assert_close(target, z - torch.tensor([0.2, -0.1]))
    objective.prepare_data(str(tmp_path), "cpu")
    pairs = objective.dataset().tensors
    logs = objective.loss("generator", {k: v[:32] for k, v in pairs.items()}, 0)
    logs["loss"].backward()
    assert set(logs) == {"loss", "distill", "two_step"}
    assert all(p.grad is not None for p in objective.generator.backbone.parameters())
    assert objective.teacher.backbone.velocity.grad is None


def test_refusals_name_the_key_and_the_fix(exported_two_rf, tmp_path, capsys):
    with pytest.raises(ConfigError, match="student.schedule=flow"):
        reflow(tmp_path, "student.schedule=teacher")  # a VP teacher's schedule
    one_step = tmp_path / "one_step"
    one_step.mkdir()
    recipe = json.loads((exported_two_rf[1] / "student.json").read_text())
    (one_step / "student.json").write_text(json.dumps({**recipe, "any_num_steps": False, "timesteps": [1000.0]}))
    with pytest.raises(ValueError, match="no ODE to sample"):
        reflow(tmp_path, "teacher.kind=mlp", f"teacher.path={one_step}", "student.schedule=teacher")
    assert main(["train", "--config", "configs/reflow_gmm.yaml", "teacher.kind=mlp",
                 f"teacher.path={tmp_path / 'nothing'}", f"train.output_dir={tmp_path / 'x'}"]) == 2
    assert "not an exported MLP student" in capsys.readouterr().err


@pytest.mark.skipif(backbone_weights_file("alex").is_file(), reason="LPIPS weights are present here")
def test_lpips_without_its_weights_stops_before_training_instead_of_falling_back(tmp_path, capsys):
    """InstaFlow's LPIPS stage, last in instaflow_sd15: the recipe refuses to start (before any stage trains)."""
    stages = ("recipe=[{name: rf2}, {name: lpips, set: {objective.name: regression, objective.loss: lpips, "
              "objective.lpips_net: alex}}]")
    code = main(["train", "--config", "configs/reflow_gmm.yaml", f"train.output_dir={tmp_path}", stages])
    err = capsys.readouterr().err
    assert code == 2 and "LPIPS is unavailable" in err and "objective.loss=l2" in err
    assert not (tmp_path / "rf2").exists()
